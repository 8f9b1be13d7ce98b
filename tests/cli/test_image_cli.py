"""The image and registry commands, run as a user runs them: the installed ``ember`` program."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.archives import rewrite_tar
from tests.support.cli import EMBER, ember_env, run_ember
from tests.support.images import copy_layout, layout_ref, push_layout
from tests.support.passstore import PassStore
from tests.support.registry import Registry, free_port
from tests.support.terminal import on_terminal, plain

pytestmark = pytest.mark.integration


def ember(home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = ember_env(home, DOCKER_CONFIG=str(home / "no-docker"))
    return run_ember(*args, env=env, input=stdin, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ember: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]



def test_pull_ls_inspect_unpack_rm(
    tmp_path: Path, registry: Registry, busybox_layout: Path
) -> None:
    home = tmp_path / "home"
    ref = push_layout(busybox_layout, registry, "cli/busybox")
    pulled = ember(home, "image", "pull", ref)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.startswith(f"{ref}@sha256:")
    assert pulled.stderr == f"pulled {ref} (linux/amd64, 1 layer)\n"  # no progress: not a terminal
    quiet = ember(home, "image", "pull", "-q", ref)  # as docker pull -q: the name alone
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == pulled.stdout

    listed = ember(home, "image", "ls", "--json")
    records = json.loads(listed.stdout)
    assert [r["reference"] for r in records] == [ref]
    assert records[0]["platform"] == "linux/amd64"
    table = ember(home, "image", "ls")
    assert "REFERENCE" in table.stdout and "cli/busybox" in table.stdout

    inspected = json.loads(ember(home, "image", "inspect", ref).stdout)[0]
    assert inspected["manifest_digest"] == pulled.stdout.strip().split("@")[1]
    assert inspected["platform"] == "linux/amd64"
    assert inspected["config"]["cmd"] == ["/bin/sh", "-c", "echo hello from busybox"]
    assert len(inspected["layers"]) == 1 and inspected["layers"][0]["diff_id"].startswith("sha256:")
    # several at once, as docker image inspect: the ones found, an error for each other
    both = ember(home, "image", "inspect", ref, "nosuch", inspected["manifest_digest"])
    assert both.returncode == 1 and json.loads(both.stdout) == [inspected, inspected]
    assert both.stderr.count("\n") == 1 and "nosuch" in both.stderr

    root = tmp_path / "root"
    unpacked = ember(home, "image", "unpack", ref, str(root))
    assert unpacked.returncode == 0, unpacked.stderr
    assert (root / "bin" / "busybox").is_file()
    assert_one_line_error(ember(home, "image", "unpack", ref, str(root)), "not empty")

    assert ember(home, "image", "rm", ref).returncode == 0
    assert json.loads(ember(home, "image", "ls", "--json").stdout) == []
    gone = ember(home, "image", "inspect", ref)
    assert_one_line_error(gone, "not in the local store")
    assert gone.stdout == "[]\n"


def test_unpack_pulls_local_source(tmp_path: Path, busybox_layout: Path) -> None:
    root = tmp_path / "new" / "root"
    result = ember(tmp_path / "home", "image", "unpack", layout_ref(busybox_layout), str(root))
    assert result.returncode == 0, result.stderr
    assert (root / "etc" / "passwd").is_file()


def test_unpack_does_not_follow_a_symlink_named_as_its_directory(
    tmp_path: Path, busybox_layout: Path
) -> None:
    """The image's root owner and mode, its setuid files and device nodes went wherever a
    link that someone made beforehand pointed."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(elsewhere)
    result = ember(tmp_path / "home", "image", "unpack", layout_ref(busybox_layout), str(tmp_path / "link"))
    assert_one_line_error(result, "is a symbolic link")
    assert list(elsewhere.iterdir()) == [] and elsewhere.stat().st_mode & 0o777 == 0o700


def test_user_errors_are_one_line(
    tmp_path: Path, registry: Registry, auth_registry: Registry, busybox_layout: Path
) -> None:
    home = tmp_path / "home"
    assert_one_line_error(ember(home, "image", "pull", "Not/Valid"), "lowercase")
    assert_one_line_error(ember(home, "image", "pull", "a:b:c"), "invalid")
    assert_one_line_error(
        ember(home, "image", "pull", f"127.0.0.1:{free_port()}/x/y"), "cannot reach registry"
    )
    push_layout(busybox_layout, registry, "cli/known")
    assert_one_line_error(
        ember(home, "image", "pull", f"{registry.host}/cli/known:nope"), "not found"
    )
    assert_one_line_error(
        ember(home, "image", "pull", "--platform", "linux/s390x", f"{registry.host}/cli/known"),
        "linux/amd64",
    )
    assert_one_line_error(
        ember(home, "image", "pull", "--platform", "a/b/c/d", "x"), "invalid platform"
    )
    private = push_layout(busybox_layout, auth_registry, "cli/private")
    assert_one_line_error(
        ember(home, "image", "pull", private), "requires authentication", "ember registry login"
    )
    assert_one_line_error(ember(home, "image", "rm", "nothing-here"), "not in the local store")
    assert_one_line_error(
        ember(home, "image", "pull", f"oci:{tmp_path}"), "not an OCI image layout"
    )
    assert_one_line_error(
        ember(home, "image", "pull", f"docker-archive:{tmp_path}/none.tar"), "does not exist"
    )


def test_registry_login_logout(
    tmp_path: Path, auth_registry: Registry, busybox_layout: Path
) -> None:
    home = tmp_path / "home"
    host = auth_registry.host
    private = push_layout(busybox_layout, auth_registry, "cli/login")
    wrong = ember(
        home,
        "registry",
        "login",
        host,
        "-u",
        auth_registry.username or "",
        "--password-stdin",
        stdin="nope\n",
    )
    assert_one_line_error(wrong, "refused the credentials")
    assert "check them with" not in wrong.stderr  # the hint was the command just run
    assert not (home / "credentials.json").exists()
    # no terminal to ask on: said so (a prompt at the end of input was "interrupted", 130)
    for args, missing in (([host], "--username and"), ([host, "-u", "someone"], "give --password-stdin")):
        asked = ember(home, "registry", "login", *args, stdin="")
        assert_one_line_error(asked, "standard input is not a terminal")
        assert missing in asked.stderr and asked.returncode == 2

    ok = ember(
        home,
        "registry",
        "login",
        host,
        "-u",
        auth_registry.username or "",
        "--password-stdin",
        stdin=f"{auth_registry.password}\n",
    )
    assert ok.returncode == 0, ok.stderr
    creds = home / "credentials.json"
    assert creds.stat().st_mode & 0o777 == 0o600
    assert (auth_registry.password or "") not in creds.read_text()  # base64, as Docker stores it
    assert ember(home, "image", "pull", private).returncode == 0

    out = ember(home, "registry", "logout", host)
    assert out.returncode == 0 and "logged out" in out.stderr
    assert host not in json.loads(creds.read_text())["auths"]
    assert_one_line_error(ember(home, "image", "pull", private), "requires authentication")


def test_progress_on_a_terminal(tmp_path: Path, busybox_layout: Path) -> None:
    """stderr on a pseudo-terminal: rich draws one bar per layer and a total."""
    env = ember_env(tmp_path / "home", COLUMNS="120", TERM="xterm")
    code, text = on_terminal([EMBER, "image", "pull", layout_ref(busybox_layout)], env, stream="stderr")
    assert code == 0
    assert "layer 1/1" in text and "total" in text
    assert "\x1b[" in text  # drawn with terminal control sequences


def test_a_layer_damaged_in_the_store_is_named_removed_and_fetched_again(
    tmp_path: Path, busybox_layout: Path
) -> None:
    """Every unpack failed with "CRC check failed" and pulling again changed nothing: a
    pull skips the blobs the store has."""
    home, ref = tmp_path / "home", layout_ref(busybox_layout)
    assert ember(home, "image", "pull", ref).returncode == 0
    layer = json.loads(ember(home, "image", "inspect", ref).stdout)[0]["layers"][0]["digest"]
    blob = home / "content" / "blobs" / "sha256" / layer.split(":")[1]
    blob.chmod(0o644)
    with open(blob, "r+b") as f:
        f.seek(blob.stat().st_size // 2)
        f.write(b"damage")
    failed = ember(home, "image", "unpack", ref, str(tmp_path / "r1"))
    assert_one_line_error(failed, f"blob {layer} in the content store no longer matches", "run the command again")
    assert not blob.exists() and not (tmp_path / "r1").exists()
    again = ember(home, "image", "unpack", ref, str(tmp_path / "r2"))
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "r2" / "bin" / "busybox").is_file()


def test_rm_names_what_went_refuses_a_shared_digest_and_goes_on_past_failures(
    tmp_path: Path, busybox_layout: Path, multilayer_layout: Path
) -> None:
    home = tmp_path / "home"
    copy = copy_layout(busybox_layout, tmp_path / "demo")
    a, b = layout_ref(busybox_layout), layout_ref(copy)
    for ref in (a, b):
        assert ember(home, "image", "pull", ref).returncode == 0
    digest = json.loads(ember(home, "image", "inspect", a).stdout)[0]["manifest_digest"]
    short = digest.split(":")[1][:12]

    names = ", ".join(sorted((a, b)))
    refused = ember(home, "image", "rm", short)
    assert_one_line_error(refused, f"{short} is referenced by several names: {names}", "--force")
    assert refused.returncode == 2
    assert len(json.loads(ember(home, "image", "ls", "--json").stdout)) == 2

    forced = ember(home, "image", "rm", "--force", short)
    assert forced.returncode == 0, forced.stderr
    assert sorted(forced.stdout.splitlines()) == sorted([f"Untagged: {a}", f"Untagged: {b}"])

    # docker rmi A nonexist B: A and B go, nonexist is reported, the status says so
    c = layout_ref(multilayer_layout)
    for ref in (a, c):
        assert ember(home, "image", "pull", ref).returncode == 0
    mixed = ember(home, "image", "rm", a, "nonexist", c)
    assert mixed.returncode == 1
    assert mixed.stdout.splitlines() == [f"Untagged: {a}", f"Untagged: {c}"]
    assert mixed.stderr.splitlines() == [
        # as docker rmi: no advice to pull what is being removed
        "ember: image docker.io/library/nonexist:latest is not in the local store",
        "ember: 1 of 3 images not removed: nonexist",
    ]
    assert json.loads(ember(home, "image", "ls", "--json").stdout) == []


def test_what_ember_cannot_read_is_named(
    tmp_path: Path, busybox_docker_archive: Path
) -> None:
    home = tmp_path / "home"
    for ref, transport in (("dir:/tmp", "'dir:'"), (f"oci-archive:{tmp_path}/x.tar", "'oci-archive:'")):
        result = ember(home, "image", "pull", ref)
        assert_one_line_error(result, f"unsupported image transport {transport}", "oci:DIR[:TAG]")
        assert "registry host" not in result.stderr

    gzipped = tmp_path / "saved.tar.gz"
    with open(busybox_docker_archive, "rb") as src, gzip.open(gzipped, "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert_one_line_error(
        ember(home, "image", "pull", f"docker-archive:{gzipped}"),
        "is gzip-compressed: ember reads uncompressed archives only", "gunzip -k",
    )

    unknown = ember(home, "image", "inspect", "6823913902e4")
    assert_one_line_error(unknown, "no image in the local store has the ID 6823913902e4")
    assert "docker.io/library" not in unknown.stderr


def test_inspect_and_ls_report_the_same_size(tmp_path: Path, busybox_layout: Path) -> None:
    home, ref = tmp_path / "home", layout_ref(busybox_layout)
    assert ember(home, "image", "pull", ref).returncode == 0
    inspected = json.loads(ember(home, "image", "inspect", ref).stdout)[0]
    listed = json.loads(ember(home, "image", "ls", "--json").stdout)[0]
    assert inspected["size"] == listed["size"]
    assert inspected["layers_size"] == sum(x["size"] for x in inspected["layers"])
    assert inspected["size"] > inspected["layers_size"]


def test_a_failed_unpack_removes_the_directories_it_made(tmp_path: Path) -> None:
    (tmp_path / "there").mkdir()
    target = tmp_path / "there" / "new" / "a" / "b"
    result = ember(tmp_path / "home", "image", "unpack", f"oci:{tmp_path}/none:latest", str(target))
    assert_one_line_error(result, "not an OCI image layout")
    assert list((tmp_path / "there").iterdir()) == []  # new/a too, not only b


def test_ls_on_a_narrow_terminal_never_cuts_a_reference(
    tmp_path: Path, busybox_layout: Path
) -> None:
    """rich fitted the table to 80 columns by ending references with "…": two that
    differ only at the end read the same."""
    home = tmp_path / "home"
    refs = []
    for suffix in ("one", "two"):
        layout = copy_layout(busybox_layout, tmp_path / f"{'long-directory-name-' * 3}{suffix}")
        refs.append(layout_ref(layout))
        assert ember(home, "image", "pull", refs[-1]).returncode == 0
    assert all(len(r) > 80 for r in refs)
    env = ember_env(home, COLUMNS="80", TERM="xterm")
    code, drawn = on_terminal([EMBER, "image", "ls"], env)
    assert code == 0
    text = plain(drawn)
    assert "…" not in text
    for ref in refs:
        assert ref in text
    assert "DIGEST" in text and "linux/amd64" in text


def test_pull_with_docker_credential_helpers(
    tmp_path: Path, auth_registry: Registry, busybox_layout: Path, docker_pass_store: PassStore
) -> None:
    """`docker login` with `credsStore: pass` keeps the password in pass, not in
    config.json: ember asks the helper, as docker pull does (it did not, and said
    "requires authentication")."""
    home = tmp_path / "home"
    private = push_layout(busybox_layout, auth_registry, "cli/helper")
    docker_pass_store.store(auth_registry.host, auth_registry.username or "", auth_registry.password or "")
    docker = tmp_path / "docker"
    docker.mkdir()
    config = docker / "config.json"

    def pull(docker_config: dict[str, object]) -> subprocess.CompletedProcess[str]:
        config.write_text(json.dumps(docker_config))
        env = ember_env(home, DOCKER_CONFIG=str(docker), **docker_pass_store.env)
        return run_ember("image", "pull", private, env=env, timeout=300)

    # as docker login leaves it: an empty auths entry, the secret in the store
    done = pull({"auths": {auth_registry.host: {}}, "credsStore": "pass"})
    assert done.returncode == 0, done.stderr
    assert done.stderr == f"pulled {private} (linux/amd64, 1 layer)\n"
    ember(home, "image", "rm", private)
    # a helper that is not installed: one warning line, then what it says without one
    missing = pull({"credHelpers": {auth_registry.host: "nosuch"}})
    assert missing.returncode != 0
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in missing.stderr, missing.stderr
    assert lines[0].startswith("ember: ") and "docker-credential-nosuch is not installed" in lines[0]
    assert "going on without it" in lines[0]
    assert "requires authentication" in lines[1]


def test_tag_names_an_image_again_and_ls_q_lists_ids(
    tmp_path: Path, registry: Registry, busybox_layout: Path, multilayer_layout: Path
) -> None:
    """`ember image tag` as `docker tag`; `ember image ls -q` as `docker images -q`."""
    home = tmp_path / "home"
    busybox = push_layout(busybox_layout, registry, "cli/tag-busybox")
    other = push_layout(multilayer_layout, registry, "cli/tag-other")
    for ref in (busybox, other):
        assert ember(home, "image", "pull", "-q", ref).returncode == 0
    records = {r["reference"]: r for r in json.loads(ember(home, "image", "ls", "--json").stdout)}
    busybox_id = records[busybox]["manifest_digest"].split(":")[1][:12]

    done = ember(home, "image", "tag", busybox, "mine/bb:v1")
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done.stderr
    assert ember(home, "image", "tag", busybox_id, "bb2").returncode == 0  # by ID; normalised
    records = {r["reference"]: r for r in json.loads(ember(home, "image", "ls", "--json").stdout)}
    assert set(records) == {busybox, other, "docker.io/mine/bb:v1", "docker.io/library/bb2:latest"}
    for name in ("docker.io/mine/bb:v1", "docker.io/library/bb2:latest"):
        assert records[name]["manifest_digest"] == records[busybox]["manifest_digest"]
        assert records[name]["size"] == records[busybox]["size"]
    quiet = ember(home, "image", "ls", "-q")
    assert sorted(quiet.stdout.split()) == sorted(
        {r["manifest_digest"].split(":")[1][:12] for r in records.values()}
    )  # each ID once

    # a name another image had moves (as docker tag does)
    assert ember(home, "image", "tag", other, "bb2").returncode == 0
    moved = json.loads(ember(home, "image", "inspect", "bb2").stdout)[0]
    assert moved["manifest_digest"] == records[other]["manifest_digest"]
    # the image outlives the name it was pulled under
    assert ember(home, "image", "rm", busybox).returncode == 0
    assert ember(home, "image", "unpack", "mine/bb:v1", str(tmp_path / "tree")).returncode == 0
    assert (tmp_path / "tree" / "bin" / "busybox").is_file()

    # what `image pull` prints (NAME@DIGEST) names the image too, as docker tag takes it
    pinned = ember(home, "image", "pull", "-q", other).stdout.strip()
    assert "@sha256:" in pinned
    assert ember(home, "image", "tag", pinned, "pinned:1").returncode == 0
    assert json.loads(ember(home, "image", "inspect", "pinned:1").stdout)[0]["manifest_digest"] == (
        records[other]["manifest_digest"]
    )

    for args, says in (
        (("mine/bb:v1", f"x/y@sha256:{'a' * 64}"), "refusing to create a tag with a digest"),
        # names that read as an ID: `image rm ID` would then remove this image's name
        (("mine/bb:v1", "a" * 64), "64 hexadecimal characters are an image ID"),
        (("mine/bb:v1", f"sha256:{'a' * 64}"), "reads as an image ID"),
        (("mine/bb:v1", f"oci:{tmp_path}/l"), "a tag is a registry reference"),
        (("mine/bb:v1", "Not/Valid"), "lowercase"),
        (("nothere:1", "x/y"), "not in the local store"),
    ):
        assert_one_line_error(ember(home, "image", "tag", *args), says)
    assert_one_line_error(ember(home, "image", "ls", "-q", "--json"), "cannot be used together")
    # an image that lost a layer is not named again (the name would be a broken image)
    layer = json.loads(ember(home, "image", "inspect", other).stdout)[0]["layers"][-1]["digest"]
    (home / "content" / "blobs" / "sha256" / layer.split(":")[1]).unlink()
    assert_one_line_error(ember(home, "image", "tag", other, "broken:1"), "lost layer")

    # every ID once, so that removing them all by ID works in one go
    ids = ember(home, "image", "ls", "-q").stdout.split()
    assert ember(home, "image", "rm", "-f", *ids).returncode == 0
    assert ember(home, "image", "ls", "-q").stdout == ""


def test_ls_format_as_docker_images_format(tmp_path: Path, busybox_layout: Path) -> None:
    """``image ls --format``: docker's image fields; a template wins over -q, as docker's
    (``table`` does not); refusals are one line with exit code 2."""
    from ember.cli.common import ago
    from ember.sizes import human_size

    home = tmp_path / "home"
    ref = layout_ref(busybox_layout)
    assert ember(home, "image", "pull", "-q", ref).returncode == 0
    assert ember(home, "image", "tag", ref, "demo:1").returncode == 0
    assert ember(home, "image", "tag", ref, "registry.example:5000/team/web:2").returncode == 0
    inspected = json.loads(ember(home, "image", "inspect", "demo:1").stdout)[0]
    digest, built = inspected["manifest_digest"], inspected["config"]["created"]
    short, size = digest.split(":")[1][:12], human_size(inspected["size"], decimal=True)

    def ls(*args: str) -> subprocess.CompletedProcess[str]:
        env = ember_env(home, DOCKER_CONFIG=str(home / "no-docker"), TZ="UTC")
        return run_ember("image", "ls", *args, env=env, timeout=300)

    # one row a name, in ls's order: the familiar name and the tag apart
    fields = "{{.Repository}}|{{.Tag}}|{{.ID}}|{{.Digest}}|{{.Size}}|{{.CreatedSince}}"
    assert ls("--format", fields).stdout.splitlines() == [
        f"{name}|{tag}|{short}|{digest}|{size}|{ago(built)}"
        for name, tag in (("demo", "1"), (f"oci:{busybox_layout}", "latest"),
                          ("registry.example:5000/team/web", "2"))  # fmt: skip
    ]
    assert built == "2024-01-01T00:00:00Z"  # the image's build time, from its config
    assert ls("--format", "{{.CreatedAt}}").stdout == "2024-01-01 00:00:00 +0000 UTC\n" * 3
    objects = [json.loads(line) for line in ls("--format", "json").stdout.splitlines()]
    assert objects[0] == {
        "ID": short, "Repository": "demo", "Tag": "1", "Digest": digest, "Size": size,
        "CreatedSince": ago(built), "CreatedAt": "2024-01-01 00:00:00 +0000 UTC",
    }  # fmt: skip
    table = ls("--format", "table {{.Repository}}\\t{{.Tag}}\\t{{.ID}}").stdout.splitlines()
    assert table[0] == "REPOSITORY" + " " * (len(f"oci:{busybox_layout}") - 7) + "TAG       IMAGE ID"
    assert table[1].split() == ["demo", "1", short] and len(table) == 4
    # the default table (without its PULLED times, which move on between two commands)
    default, plain = (ls(*args).stdout.splitlines() for args in (("--format", "table"), ()))
    assert [line.split()[:4] for line in default] == [line.split()[:4] for line in plain]
    assert default[0] == plain[0] and len(default) == 4

    # a template wins over -q (docker images'), table does not
    assert ls("-q", "--format", "{{.Tag}}").stdout == "1\nlatest\n2\n"
    assert ls("-q", "--format", "table").stdout == f"{short}\n"
    for args, says in (
        (("--format", "{{.Containers}}"), "ember image ls has no .Containers"),
        (("--format", '{{.Label "x"}}'), "unknown field .Label for ember image ls"),
        (("--format", "{{.Tag}"), "'{{' without its '}}'"),
        (("--json", "--format", "json"), "--json and --format cannot be used together"),
    ):
        res = ls(*args)
        assert (res.returncode, res.stdout) == (2, ""), res.stderr
        assert_one_line_error(res, says)


def test_repository_and_tag_of_local_names() -> None:
    from ember.cli.image import _repository_and_tag

    assert _repository_and_tag("docker.io/library/debian:12") == ("debian", "12")
    assert _repository_and_tag("docker.io/team/web:latest") == ("team/web", "latest")
    assert _repository_and_tag(f"127.0.0.1:5000/x@sha256:{'a' * 64}") == ("127.0.0.1:5000/x", "<none>")
    assert _repository_and_tag("oci:/srv/layout:v1") == ("oci:/srv/layout", "v1")
    assert _repository_and_tag("docker-archive:/srv/web.tar") == ("docker-archive:/srv/web.tar", "<none>")


def test_history_as_docker_history(tmp_path: Path, multilayer_layout: Path) -> None:
    home = tmp_path / "home"
    ref = layout_ref(multilayer_layout)
    assert ember(home, "image", "pull", "-q", ref).returncode == 0
    inspected = json.loads(ember(home, "image", "inspect", ref).stdout)[0]
    layers = [x["digest"] for x in inspected["layers"]]
    history = inspected["config"]["history"]
    assert len(history) == 14 and sum(not h["empty_layer"] for h in history) == len(layers) == 5

    steps = json.loads(ember(home, "image", "history", "--json", ref).stdout)
    assert [s["created_by"] for s in steps] == [h["created_by"] for h in reversed(history)]  # newest first
    assert [s["layer"] for s in steps if s["layer"]] == list(reversed(layers))
    assert steps[0]["created_by"] == '/bin/sh -c #(nop) CMD ["default-cmd"]'
    assert steps[0]["layer"] is None and steps[0]["size"] == 0
    assert steps[-1]["size"] == inspected["layers"][0]["size"]

    table = ember(home, "image", "history", ref).stdout.splitlines()
    assert table[0].split() == ["LAYER", "CREATED", "CREATED", "BY", "SIZE", "COMMENT"]
    assert len(table) == 15
    assert table[1].startswith("-") and "years ago" in table[1]
    assert "/bin/sh -c #(nop) CMD [\"default-cmd\"]" in table[1]
    run = next(line for line in table if "mkdir -p /data/dir/deep" in line)
    assert run.startswith(layers[1].split(":")[1][:12])
    # cut to 45 characters as docker history does, the whole with --no-trunc
    assert "/bin/sh -c mkdir -p /data/dir/deep /data/opa…" in run
    whole = ember(home, "image", "history", "--no-trunc", ref).stdout
    assert "needs-a-pax-or-gnu-header" in whole
    assert_one_line_error(ember(home, "image", "history", "nothere:1"), "not in the local store")


def test_save_writes_what_docker_load_podman_skopeo_and_ember_read(
    tmp_path: Path, registry: Registry, busybox_layout: Path, multilayer_layout: Path
) -> None:
    """`ember image save` as `docker save`: one tar that is a docker-archive and an OCI
    layout, read back by podman load, skopeo (both transports) and ember itself."""
    from tests.support.images import podman_storage
    from tests.support.treecmp import assert_same_tree, umoci_unpack

    home = tmp_path / "home"
    bb = push_layout(busybox_layout, registry, "cli/save-bb", tag="one")
    ml = push_layout(multilayer_layout, registry, "cli/save-ml", tag="two")
    for ref in (bb, ml):
        assert ember(home, "image", "pull", "-q", ref).returncode == 0
    archive = tmp_path / "images.tar"
    done = ember(home, "image", "save", "-o", str(archive), bb, ml)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left
    # the same bytes on standard output (and the same images give the same archive)
    piped = subprocess.run([EMBER, "image", "save", bb, ml], env=ember_env(home, DOCKER_CONFIG="-"),
                           capture_output=True, check=True)  # fmt: skip
    assert piped.stdout == archive.read_bytes()

    ml_digest = json.loads(ember(home, "image", "inspect", ml).stdout)[0]["manifest_digest"]
    expected = umoci_unpack(multilayer_layout, "latest", tmp_path / "expected")
    # skopeo, as a docker-archive (by its name in RepoTags) and as an OCI archive (by tag)
    for source, out in ((f"docker-archive:{archive}:{ml}", "from-docker"), (f"oci-archive:{archive}:two", "from-oci")):
        subprocess.run(["skopeo", "copy", "--quiet", source, f"oci:{tmp_path / out}:latest"], check=True)
        assert_same_tree(umoci_unpack(tmp_path / out, "latest", tmp_path / f"{out}-tree"), expected)
    inspected = subprocess.run(["skopeo", "inspect", f"oci-archive:{archive}:two"], capture_output=True,
                               text=True, check=True)  # fmt: skip
    assert json.loads(inspected.stdout)["Digest"] == ml_digest  # the manifest as pulled: same ID

    # podman load: both images, under their names
    (tmp_path / "podman").mkdir()
    with podman_storage(tmp_path / "podman") as podman:
        podman("load", "--quiet", "-i", str(archive))
        names = podman("images", "--format", "{{.Repository}}:{{.Tag}}").split()
    assert sorted(names) == sorted([bb, ml])

    # ember itself, on another host
    other = tmp_path / "other"
    assert ember(other, "image", "pull", "-q", f"docker-archive:{archive}:{ml}").returncode == 0
    loaded = json.loads(ember(other, "image", "inspect", f"docker-archive:{archive}:{ml}").stdout)[0]
    assert loaded["manifest_digest"] == ml_digest  # the same ID
    assert ember(other, "image", "unpack", f"docker-archive:{archive}:{ml}", str(tmp_path / "ours")).returncode == 0
    assert_same_tree(tmp_path / "ours", expected)


def test_save_refuses_what_it_cannot_do_and_leaves_nothing(
    tmp_path: Path, registry: Registry, busybox_layout: Path
) -> None:
    home = tmp_path / "home"
    ref = push_layout(busybox_layout, registry, "cli/save-errors")
    assert ember(home, "image", "pull", "-q", ref).returncode == 0
    out = tmp_path / "out"
    out.mkdir()
    assert_one_line_error(ember(home, "image", "save", "-o", str(out / "a.tar"), "nothere:1"),
                          "not in the local store")  # fmt: skip
    assert_one_line_error(ember(home, "image", "save", "-o", str(out / "no" / "a.tar"), ref),
                          "cannot write")  # fmt: skip
    assert_one_line_error(ember(home, "image", "save", "-o", str(out), ref), "is a directory")
    status, drawn = on_terminal([EMBER, "image", "save", ref], ember_env(home, DOCKER_CONFIG="-"),
                                stream="stdout")  # fmt: skip
    assert status == 2 and drawn == ""  # refused (the message goes to stderr), no tar drawn
    # a layer damaged in the store: no archive, and the file that was there stays
    layer = json.loads(ember(home, "image", "inspect", ref).stdout)[0]["layers"][0]["digest"]
    blob = home / "content" / "blobs" / "sha256" / layer.split(":")[1]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    (out / "a.tar").write_text("the old archive")
    damaged = ember(home, "image", "save", "-o", str(out / "a.tar"), ref)
    assert_one_line_error(damaged, "no longer matches its digest")
    assert sorted(p.name for p in out.iterdir()) == ["a.tar"]
    assert (out / "a.tar").read_text() == "the old archive"
    # on standard output, the damaged blob is never sent (checked before it goes out)
    with (tmp_path / "piped.tar").open("wb") as f:
        piped = subprocess.run([EMBER, "image", "save", ref], stdout=f, stderr=subprocess.PIPE,
                               env=ember_env(home, DOCKER_CONFIG="-"))  # fmt: skip
    assert piped.returncode != 0 and b"no longer matches its digest" in piped.stderr
    assert f"blobs/sha256/{layer.split(':')[1]}" not in _member_names(tmp_path / "piped.tar")


def _member_names(path: Path) -> list[str]:
    """The members of a tar stream, as far as it goes (a stream cut short: up to there)."""
    import tarfile

    names: list[str] = []
    try:
        with tarfile.open(path, "r|") as t:
            names.extend(m.name for m in t)
    except tarfile.TarError:
        pass
    return names


def test_save_never_replaces_what_is_not_a_file_and_leaves_nothing_when_killed(
    tmp_path: Path, busybox_layout: Path, debian_layout: Path
) -> None:
    import os
    import signal
    import stat
    import time

    home = tmp_path / "home"
    bb = layout_ref(busybox_layout)
    assert ember(home, "image", "pull", "-q", bb).returncode == 0
    out = tmp_path / "out"
    out.mkdir()
    os.mknod(out / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(out / "fifo")
    (out / "target").write_text("kept")
    (out / "link").symlink_to("target")
    for name in ("null", "fifo", "link"):
        assert_one_line_error(ember(home, "image", "save", "-o", str(out / name), bb), "not a regular file")
    assert stat.S_ISCHR((out / "null").lstat().st_mode) and stat.S_ISFIFO((out / "fifo").lstat().st_mode)
    assert (out / "link").is_symlink() and (out / "target").read_text() == "kept"
    # the archive is private, as docker save -o makes it
    assert ember(home, "image", "save", "-o", str(out / "bb.tar"), bb).returncode == 0
    assert stat.S_IMODE((out / "bb.tar").stat().st_mode) == 0o600

    # killed while it writes: nothing of it is left in the directory (it has no name yet)
    deb = layout_ref(debian_layout)
    assert ember(home, "image", "pull", "-q", deb).returncode == 0
    before = sorted(p.name for p in out.iterdir())
    proc = subprocess.Popen([EMBER, "image", "save", "-o", str(out / "deb.tar"), deb],
                            env=ember_env(home, DOCKER_CONFIG="-", EMBER_AGENT="0"))  # fmt: skip
    deadline = time.monotonic() + 60
    writing = False
    while not writing and proc.poll() is None and time.monotonic() < deadline:
        for fd in Path(f"/proc/{proc.pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(str(out)) and os.path.getsize(fd) > 1 << 20:
                writing = True  # the archive's file is open, and a megabyte is in
        time.sleep(0.002)
    assert writing, "the save ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sorted(p.name for p in out.iterdir()) == before


def test_save_names_images_as_they_were_given(
    tmp_path: Path, registry: Registry, busybox_layout: Path
) -> None:
    """As docker save: an image given by ID goes without a name (not whichever name it
    has here, which a load would then put on another host's image); NAME@DIGEST without a
    tag; a name given twice once."""
    import tarfile

    home = tmp_path / "home"
    ref = push_layout(busybox_layout, registry, "cli/save-names", tag="one")
    pinned = ember(home, "image", "pull", "-q", ref).stdout.strip()
    image_id = pinned.split("@sha256:")[1][:12]
    archive = tmp_path / "a.tar"

    def documents(*refs: str) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
        done = ember(home, "image", "save", "-o", str(archive), *refs)
        assert done.returncode == 0, done.stderr
        with tarfile.open(archive) as t:
            read = lambda name: json.loads(t.extractfile(name).read())  # type: ignore[union-attr]  # noqa: E731
            return read("manifest.json"), read("index.json")["manifests"]

    entries, index = documents(image_id)
    assert entries[0]["RepoTags"] == [] and "annotations" not in index[0]
    entries, index = documents(pinned)
    assert entries[0]["RepoTags"] == []
    assert index[0]["annotations"] == {
        "io.containerd.image.name": pinned, "org.opencontainers.image.ref.name": "one",
    }  # fmt: skip
    entries, index = documents(ref, ref, image_id)
    assert entries[0]["RepoTags"] == [ref] and len(index) == 2


def test_load_names_images_as_docker_load(
    tmp_path: Path, registry: Registry, busybox_layout: Path, multilayer_layout: Path
) -> None:
    """`ember image load` as `docker load`: every image of the archive, under the names
    its RepoTags give, from -i FILE or standard input."""
    home = tmp_path / "home"
    bb = push_layout(busybox_layout, registry, "cli/load-bb", tag="one")
    ml = push_layout(multilayer_layout, registry, "cli/load-ml", tag="two")
    for ref in (bb, ml):
        assert ember(home, "image", "pull", "-q", ref).returncode == 0
    assert ember(home, "image", "tag", bb, "extra/name:3").returncode == 0
    archive = tmp_path / "images.tar"
    assert ember(home, "image", "save", "-o", str(archive), bb, ml, "extra/name:3").returncode == 0
    ids = {r["reference"]: r["manifest_digest"] for r in json.loads(ember(home, "image", "ls", "--json").stdout)}

    def loaded(where: Path) -> dict[str, str]:
        return {r["reference"]: r["manifest_digest"] for r in json.loads(ember(where, "image", "ls", "--json").stdout)}

    by_file = tmp_path / "by-file"
    done = ember(by_file, "image", "load", "-i", str(archive))
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == sorted(f"Loaded image: {n}" for n in ids)
    assert loaded(by_file) == ids  # the same names, the same IDs
    by_stdin = tmp_path / "by-stdin"
    with archive.open("rb") as f:
        piped = subprocess.run([EMBER, "image", "load"], stdin=f, capture_output=True, text=True,
                               env=ember_env(by_stdin, DOCKER_CONFIG="-"))  # fmt: skip
    assert piped.returncode == 0, piped.stderr
    assert loaded(by_stdin) == ids

    # an archive another tool wrote (skopeo, as docker save): its RepoTags name the image
    other = tmp_path / "skopeo.tar"
    subprocess.run(["skopeo", "copy", "--quiet", layout_ref(busybox_layout),
                    f"docker-archive:{other}:example.org/made/by:skopeo"], check=True)  # fmt: skip
    assert ember(tmp_path / "from-skopeo", "image", "load", "-i", str(other)).stdout == (
        "Loaded image: example.org/made/by:skopeo\n"
    )
    # untagged (the archive's own name then, which only a file has)
    untagged = tmp_path / "untagged.tar"
    subprocess.run(["skopeo", "copy", "--quiet", layout_ref(busybox_layout),
                    f"docker-archive:{untagged}"], check=True)  # fmt: skip
    quiet = tmp_path / "untagged-home"
    assert ember(quiet, "image", "load", "-i", str(untagged)).stdout == (
        f"Loaded image: docker-archive:{untagged}:@0\n"
    )
    with untagged.open("rb") as f:  # a pipe: nothing to name it after
        refused = subprocess.run(f"cat | {EMBER} image load", shell=True, stdin=f, capture_output=True,
                                 text=True, env=ember_env(tmp_path / "refused", DOCKER_CONFIG="-"))  # fmt: skip
    assert_one_line_error(refused, "has no name (RepoTags)")
    assert ember(tmp_path / "refused", "image", "ls", "-q").stdout == ""
    # a path with ':' in it (docker load takes any path), and compressed (as docker load)
    colon = tmp_path / "a:b.tar"
    shutil.copy(archive, colon)
    assert ember(tmp_path / "colon", "image", "load", "-i", str(colon)).returncode == 0
    assert loaded(tmp_path / "colon") == ids
    with gzip.open(tmp_path / "images.tar.gz", "wb") as z:
        z.write(archive.read_bytes())
    assert ember(tmp_path / "gz", "image", "load", "-i", str(tmp_path / "images.tar.gz")).returncode == 0
    assert loaded(tmp_path / "gz") == ids
    with (tmp_path / "images.tar.gz").open("rb") as f:
        piped = subprocess.run(f"cat | {EMBER} image load", shell=True, stdin=f, capture_output=True,
                               text=True, env=ember_env(tmp_path / "gz-pipe", DOCKER_CONFIG="-"))  # fmt: skip
    assert piped.returncode == 0, piped.stderr
    assert loaded(tmp_path / "gz-pipe") == ids
    (tmp_path / "bad.tar.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 100)
    with (tmp_path / "bad.tar.gz").open("rb") as f:
        bad = subprocess.run([EMBER, "image", "load"], stdin=f, capture_output=True, text=True,
                             env=ember_env(tmp_path / "bad-gz", DOCKER_CONFIG="-"))  # fmt: skip
    assert_one_line_error(bad, "standard input is not valid gzip data")
    not_tar = tmp_path / "not.tar"
    not_tar.write_text("hello")
    assert_one_line_error(ember(tmp_path / "bad", "image", "load", "-i", str(not_tar)), "not.tar")


def test_history_shows_what_an_image_says_as_text(tmp_path: Path, busybox_layout: Path) -> None:
    """A history's escape sequences never reach the terminal, and its brackets are not
    rich markup (`RUN echo [/]` was a traceback on a terminal, `[bold]` vanished)."""
    layout = copy_layout(busybox_layout, tmp_path / "layout")
    said = "RUN echo \x1b]0;PWNED\x07 [bold] x [/] y"
    subprocess.run(["umoci", "config", "--image", f"{layout}:latest", "--history.created_by", said,
                    "--history.comment", "c\x1b[2J", "--config.cmd", "sh"],
                   check=True, capture_output=True)  # fmt: skip
    home = tmp_path / "home"
    ref = layout_ref(layout)
    assert ember(home, "image", "pull", "-q", ref).returncode == 0
    shown = "RUN echo \\x1b]0;PWNED\\x07 [bold] x [/] y"
    piped = ember(home, "image", "history", "--no-trunc", ref)
    assert piped.returncode == 0 and shown in piped.stdout and "c\\x1b[2J" in piped.stdout
    assert "\x1b" not in piped.stdout and "\x07" not in piped.stdout
    status, drawn = on_terminal([EMBER, "image", "history", "--no-trunc", ref],
                                ember_env(home, DOCKER_CONFIG="-"))  # fmt: skip
    assert status == 0 and shown in plain(drawn), drawn
    assert "\x1b]0;" not in drawn and "\x1b[2J" not in drawn


def _retagged(src: Path, dest: Path, entries: list[dict[str, object]]) -> None:
    """``src`` (a saved archive) with another manifest.json."""
    rewrite_tar(src, dest, {"manifest.json": json.dumps(entries).encode()})


def test_load_says_what_it_loaded_as_it_goes_and_what_it_could_not_name(
    tmp_path: Path, busybox_layout: Path, multilayer_layout: Path
) -> None:
    """An image that fails part-way leaves those before it loaded, and said so (docker
    load prints each as it goes); RepoTags that are no names to record an image under
    (an ID's shape, a local source's, a transport, invalid) are said and passed over."""
    home = tmp_path / "home"
    bb, ml = layout_ref(busybox_layout), layout_ref(multilayer_layout)
    for ref in (bb, ml):
        assert ember(home, "image", "pull", "-q", ref).returncode == 0
    archive = tmp_path / "two.tar"
    assert ember(home, "image", "save", "-o", str(archive), bb, ml).returncode == 0
    import tarfile

    with tarfile.open(archive) as t:
        entries = json.loads(t.extractfile("manifest.json").read())  # type: ignore[union-attr]
    bb_id = json.loads(ember(home, "image", "inspect", bb).stdout)[0]["manifest_digest"]
    first, second = ({**e} for e in entries)
    first["RepoTags"] = ["first:1", f"sha256:{bb_id.split(':')[1]}", "oci:5000/foo:1", "dir:5000/x:1", "BUSYBOX"]
    broken = {**second, "Layers": ["nope.tar"] * len(second["Layers"]), "RepoTags": ["broken:1"]}
    third = {**second, "RepoTags": ["third:1"]}
    odd = tmp_path / "odd.tar"
    _retagged(archive, odd, [first, broken, third])
    other = tmp_path / "other"
    done = ember(other, "image", "load", "-i", str(odd))
    assert done.returncode != 0
    assert done.stdout == "Loaded image: docker.io/library/first:1\n"  # said before the failure
    warnings = [line for line in done.stderr.splitlines() if "not used" in line]
    assert len(warnings) == 4, done.stderr
    assert "reads as an image ID" in warnings[0] and "not an oci: or docker-archive: source" in warnings[1]
    assert "unsupported image transport" in warnings[2] and "lowercase" in warnings[3]
    assert "lacks 'nope.tar'" in done.stderr.splitlines()[-1] and "Traceback" not in done.stderr
    names = {r["reference"] for r in json.loads(ember(other, "image", "ls", "--json").stdout)}
    assert names == {"docker.io/library/first:1"}

    # a name another image had moves, and says so
    _retagged(archive, odd, [{**second, "RepoTags": ["first:1"]}])
    moved = ember(other, "image", "load", "-i", str(odd))
    assert moved.returncode == 0, moved.stderr
    assert f"docker.io/library/first:1 moved from image {bb_id.split(':')[1][:12]}" in moved.stderr
