"""Test images built with real tools, once, and cached across test runs.

Every image is an OCI image layout (tag ``latest``) under ``$EMBER_TEST_CACHE``
(default ``/var/cache/ember-tests``) in a directory named after the image and
a hash of its recipe, so a changed recipe gets a fresh build and an unchanged
one is reused.  Builds run in a temporary directory next to the final one and
are renamed into place, under a file lock, so concurrent pytest processes build
each image once and nobody ever sees half a layout.

The cached layouts are shared: treat them as read-only (copy them with
``copy_layout`` before changing anything).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ember.oci.digest import Digest
from tests.support.registry import Registry

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_SCRIPT = REPO_ROOT / "scripts" / "build-demo-image"
DEFAULT_CACHE = Path("/var/cache/ember-tests")
TAG = "latest"
DEBIAN_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"


class ImageBuildError(RuntimeError):
    """A test image could not be built; the message carries the tool's output."""


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    path = Path(os.environ.get("EMBER_TEST_CACHE") or DEFAULT_CACHE)
    path.mkdir(parents=True, exist_ok=True)
    return path


def recipe_key(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        # length prefix: ("ab", "c") and ("a", "bc") must not collide
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _is_layout(path: Path) -> bool:
    return (path / "oci-layout").is_file() and (path / "index.json").is_file()


def _unmount_below(path: Path) -> None:
    """Lazily unmount anything mounted under ``path`` (debootstrap's /proc, overlay
    storage), deepest first, so removing a failed build never descends a mount."""
    prefix = str(path.resolve()).rstrip("/") + "/"
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].replace("\\040", " ")
            if mnt.startswith(prefix):
                mounts.append(mnt)
    for mnt in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)


def remove_tree(path: Path) -> None:
    if path.exists() or path.is_symlink():
        _unmount_below(path)
        shutil.rmtree(path, ignore_errors=True)


def cached_layout(
    name: str,
    key: str,
    build: Callable[[Path], None],
    *,
    is_complete: Callable[[Path], bool] = _is_layout,
) -> Path:
    """The cached layout ``name-key``, building it with ``build(tmpdir)`` if missing.

    ``build`` must leave a complete OCI image layout (or whatever
    ``is_complete`` checks for) at the path it is given (the path does not
    exist yet when it is called).
    """
    cache = cache_dir()
    final = cache / f"{name}-{key}"
    if is_complete(final):
        return final
    with _file_lock(cache / f".{name}-{key}.lock"):
        if is_complete(final):  # another process built it while we waited
            return final
        for stale in cache.glob(f".{name}-{key}.build-*"):
            remove_tree(stale)  # left by a killed build; we hold the lock
        remove_tree(final)  # not a complete layout: discard
        work = Path(tempfile.mkdtemp(prefix=f".{name}-{key}.build-", dir=cache))
        try:
            out = work / "layout"
            build(out)
            if not is_complete(out):
                raise ImageBuildError(f"building {name} left no complete result at {out}")
            os.rename(out, final)
        finally:
            remove_tree(work)
    return final


def copy_layout(layout: Path, dest: Path) -> Path:
    """A private, writable copy of a cached layout."""
    shutil.copytree(layout, dest, symlinks=True)
    return dest


# --------------------------------------------------------------------------- tools


def run(
    cmd: Sequence[str | Path], *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> str:
    """Run a tool; on failure raise ImageBuildError with its output."""
    argv = [str(c) for c in cmd]
    proc = subprocess.run(
        argv,
        env={**os.environ, **env} if env else None,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise ImageBuildError(f"{' '.join(argv)} failed with {proc.returncode}:\n{tail}")
    return proc.stdout


def layout_ref(layout: Path, tag: str = TAG) -> str:
    """The ``oci:`` transport reference skopeo/buildah understand."""
    return f"oci:{layout}:{tag}"


def inspect_raw(layout: Path, tag: str = TAG) -> dict[str, Any]:
    """The top-level manifest or index of a layout's tag, parsed."""
    data: dict[str, object] = json.loads(
        run(["skopeo", "inspect", "--raw", layout_ref(layout, tag)])
    )
    return data


class ContainerTool:
    """buildah or podman with its own storage root, never the host's.

    As root here: ``--isolation chroot`` for buildah (no runc/crun namespaces
    needed) and the ``overlay`` storage driver when the kernel lets us mount
    it, else ``vfs`` (e.g. inside a container whose root is already
    overlayfs).  A private storage.conf keeps the host's
    /etc/containers/storage.conf out of it; a private auth file keeps
    ``login`` credentials out of /run/containers; podman's tmpdir and events
    stay under the root too.  ``podman run`` does not work on these machines
    (crun cannot set RLIMIT_NOFILE): use podman for pull/push/login/tag only.
    """

    def __init__(self, tool: str, root: Path, driver: str) -> None:
        self.tool = tool
        self.root = root
        self.driver = driver
        root.mkdir(parents=True, exist_ok=True)
        # podman refuses a runroot longer than 50 characters: keep it short, in /tmp
        self.runroot = Path(tempfile.mkdtemp(prefix=f"ember-{tool}-run-"))
        conf = root / "storage.conf"
        conf.write_text(
            "[storage]\n"
            f'driver = "{driver}"\n'
            f'graphroot = "{root / "graph"}"\n'
            f'runroot = "{self.runroot}"\n'
        )
        self.auth_file = root / "auth.json"
        self.auth_file.write_text('{"auths": {}}\n')  # the tools refuse a missing one
        self.env = {
            "CONTAINERS_STORAGE_CONF": str(conf),
            "REGISTRY_AUTH_FILE": str(self.auth_file),
            "BUILDAH_ISOLATION": "chroot",
            "STORAGE_DRIVER": driver,
        }
        self.global_args: list[str | Path] = [
            "--root",
            root / "graph",
            "--runroot",
            self.runroot,
            "--storage-driver",
            driver,
        ]
        if tool == "podman":
            self.global_args += [
                "--tmpdir",
                root / "tmp",
                "--events-backend",
                "none",
                "--cgroup-manager",
                "cgroupfs",
            ]

    def __call__(self, *args: str | Path, cwd: Path | None = None) -> str:
        return run([self.tool, *self.global_args, *args], env=self.env, cwd=cwd)

    def destroy(self) -> None:
        # remove containers first so overlay mounts are released, then the files
        rm_all = ["rm", "--all"] + (["--force"] if self.tool == "podman" else [])
        with contextlib.suppress(ImageBuildError):
            self(*rm_all)
        with contextlib.suppress(ImageBuildError):
            self("rmi", "--all", "--force")
        remove_tree(self.root)
        remove_tree(self.runroot)


Buildah = ContainerTool  # the name the image builders below read best with

_probed_driver: str | None = None


def storage_driver(parent: Path) -> str:
    """The storage driver to use here: $EMBER_TEST_BUILDAH_DRIVER, else overlay if
    buildah can mount a container with it, else vfs.  Probed once per process."""
    global _probed_driver
    forced = os.environ.get("EMBER_TEST_BUILDAH_DRIVER")
    if forced:
        return forced
    if _probed_driver is None:
        probe = ContainerTool(
            "buildah", Path(tempfile.mkdtemp(prefix="probe-overlay-", dir=parent)), "overlay"
        )
        try:
            cid = probe("from", "scratch").strip()
            probe("mount", cid)
            probe("rm", cid)
            _probed_driver = "overlay"
        except ImageBuildError:
            _probed_driver = "vfs"
        finally:
            probe.destroy()
    return _probed_driver


@contextlib.contextmanager
def _storage(tool: str, parent: Path) -> Iterator[ContainerTool]:
    driver = storage_driver(parent)
    t = ContainerTool(tool, Path(tempfile.mkdtemp(prefix=f"{tool}-{driver}-", dir=parent)), driver)
    try:
        yield t
    finally:
        t.destroy()


def buildah_storage(parent: Path) -> contextlib.AbstractContextManager[ContainerTool]:
    """A throwaway buildah (private storage under ``parent``), removed on exit."""
    return _storage("buildah", parent)


def podman_storage(parent: Path) -> contextlib.AbstractContextManager[ContainerTool]:
    """A throwaway podman (private storage and auth file under ``parent``), removed on exit.

    Example: ``with podman_storage(tmp_path) as podman: podman("pull", "oci:...")``.
    """
    return _storage("podman", parent)


# --------------------------------------------------------------------------- images


def _busybox(arch: str) -> Path:
    script = DEMO_SCRIPT.read_bytes()
    busybox = Path("/bin/busybox").read_bytes()
    key = recipe_key("busybox", script, hashlib.sha256(busybox).hexdigest(), arch)

    def build(out: Path) -> None:
        run([DEMO_SCRIPT, out], env={"EMBER_DEMO_ARCH": arch})

    name = "busybox" if arch == "amd64" else f"busybox-{arch}"
    return cached_layout(name, key, build)


def build_busybox_layout() -> Path:
    """Scratch image with busybox-static; same recipe as ``make demo``."""
    return _busybox("amd64")


MULTILAYER_DOCKERFILE = r"""
FROM localhost/ember-busybox:latest
# layer: the lower content the next layers change
RUN mkdir -p /data/dir/deep /data/opaque/sub /data/setgid \
 && echo keep > /data/keep \
 && echo gone > /data/gone \
 && echo deep > /data/dir/deep/file \
 && echo lower > /data/opaque/old \
 && echo sub > /data/opaque/sub/x \
 && echo file > /data/file-to-link \
 && ln -s keep /data/link-to-dir \
 && echo original > /data/hardlink-src \
 && echo setuid > /data/suid \
 && echo owned > /data/owned \
 && yes ember | head -c 1048576 > /data/big \
 && : > /data/empty \
 && echo unicode > "/data/ünïcödé name" \
 && mkdir -p /data/a-rather-long-directory-name-to-push-paths-past-one-hundred-bytes/and-a-second-long-component-too \
 && echo long > /data/a-rather-long-directory-name-to-push-paths-past-one-hundred-bytes/and-a-second-long-component-too/file-with-a-long-name-as-well \
 && echo longname > /data/a-single-file-name-longer-than-the-one-hundred-bytes-of-a-ustar-name-field-so-it-needs-a-pax-or-gnu-header
# layer: whiteouts, a directory deleted and recreated (opaque), file -> symlink,
# symlink -> directory, a hardlink to a lower-layer file, setuid/setgid, owners, a fifo
RUN rm /data/gone \
 && rm -rf /data/dir \
 && rm -rf /data/opaque && mkdir /data/opaque && echo new > /data/opaque/new \
 && rm /data/file-to-link && ln -s keep /data/file-to-link \
 && rm /data/link-to-dir && mkdir /data/link-to-dir && echo in > /data/link-to-dir/f \
 && ln /data/hardlink-src /data/hardlink-dst \
 && chmod 4755 /data/suid \
 && chmod 2775 /data/setgid \
 && chown 1000:2000 /data/owned && chmod 0640 /data/owned \
 && mkfifo /data/fifo
# layer: new content for one name of a hardlink pair; the other keeps the old
RUN echo changed > /data/hardlink-dst
# layer: a file carrying a user.* xattr (COPY keeps it)
COPY xattr-file /data/xattr-file
ENV GREETING=hello EMBER_TEST=multilayer
WORKDIR /home/app
USER app
EXPOSE 8080/tcp 53/udp
STOPSIGNAL SIGTERM
VOLUME /data/volume
LABEL org.ember.test=multilayer
ENTRYPOINT ["/bin/echo", "entrypoint"]
CMD ["default-cmd"]
"""


def build_multilayer_layout() -> Path:
    """``buildah bud --layers`` on top of the busybox image; see MULTILAYER_DOCKERFILE."""
    base = build_busybox_layout()
    key = recipe_key("multilayer", MULTILAYER_DOCKERFILE, base.name)

    def build(out: Path) -> None:
        parent = out.parent
        ctx = parent / "context"
        ctx.mkdir()
        (ctx / "Dockerfile").write_text(MULTILAYER_DOCKERFILE)
        (ctx / "xattr-file").write_text("xattr\n")
        os.setxattr(ctx / "xattr-file", "user.ember", b"kept")
        with buildah_storage(parent) as b:
            image_id = b("pull", "--quiet", layout_ref(base)).strip().splitlines()[-1]
            b("tag", image_id, "localhost/ember-busybox:latest")
            b(
                "bud",
                "--quiet",
                "--layers",
                "--isolation",
                "chroot",
                "--pull-never",
                "--timestamp",
                "1704067200",
                "-t",
                "ember-multilayer",
                ctx,
            )
            b("push", "--quiet", "ember-multilayer", layout_ref(out))
            (out / ".ember-build.json").write_text(json.dumps({"storage_driver": b.driver}))

    return cached_layout("multilayer", key, build)


def build_zstd_layout() -> Path:
    """The multilayer image with every layer recompressed as zstd by skopeo."""
    src = build_multilayer_layout()
    key = recipe_key("zstd", src.name)

    def build(out: Path) -> None:
        run(
            [
                "skopeo",
                "copy",
                "--quiet",
                "--dest-compress-format",
                "zstd",
                layout_ref(src),
                layout_ref(out),
            ]
        )

    return cached_layout("zstd", key, build)


def build_multiarch_layout() -> Path:
    """An OCI index with linux/amd64 (runnable busybox) and linux/arm64 (same
    files, arm64 in its config: never run) made with ``buildah manifest``."""
    amd64 = _busybox("amd64")
    arm64 = _busybox("arm64")
    key = recipe_key("multiarch", amd64.name, arm64.name)

    def build(out: Path) -> None:
        with buildah_storage(out.parent) as b:
            b("manifest", "create", "ember-multiarch")
            b("manifest", "add", "ember-multiarch", layout_ref(amd64))
            b("manifest", "add", "ember-multiarch", layout_ref(arm64))
            b("manifest", "push", "--quiet", "--all", "ember-multiarch", layout_ref(out))

    return cached_layout("multiarch", key, build)


# --------------------------------------------------------------------------- debian


def debian_mirror() -> str:
    """The Debian mirror apt uses here ($EMBER_DEBIAN_MIRROR overrides)."""
    env = os.environ.get("EMBER_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    sources: list[Path] = []
    for p in [Path("/etc/apt/sources.list")] + sorted(Path("/etc/apt/sources.list.d").glob("*")):
        if p.is_file() and (p.name == "sources.list" or p.suffix in (".list", ".sources")):
            sources.append(p)
    for p in sources:
        text = p.read_text(errors="replace")
        if p.suffix == ".sources":
            # deb822 stanzas: take the URI of one that carries the plain suite
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(
                    (k.strip().lower(), v.strip())
                    for k, _, v in (line.partition(":") for line in stanza.splitlines())
                    if not k.startswith("#") and v
                )
                suites = fields.get("suites", "").split()
                if DEBIAN_SUITE in suites and "deb" in fields.get("types", "").split():
                    return fields["uris"].split()[0].rstrip("/")
        else:
            for line in text.splitlines():
                words = line.split("#", 1)[0].split()
                if words[:1] == ["deb"]:
                    words = [w for w in words[1:] if not w.startswith("[")]
                    if len(words) >= 2 and words[1] == DEBIAN_SUITE:
                        return words[0].rstrip("/")
    return DEFAULT_MIRROR


DEBIAN_RECIPE_VERSION = "1"


def build_debian_layout() -> Path:
    """``debootstrap --variant=minbase bookworm`` packed as one layer with umoci."""
    mirror = debian_mirror()
    key = recipe_key("debian", DEBIAN_RECIPE_VERSION, DEBIAN_SUITE, mirror)

    def build(out: Path) -> None:
        bundle = out.parent / "bundle"
        run(["umoci", "init", "--layout", out])
        run(["umoci", "new", "--image", f"{out}:{TAG}"])
        run(["umoci", "unpack", "--image", f"{out}:{TAG}", bundle])
        rootfs = bundle / "rootfs"
        try:
            run(["debootstrap", "--variant=minbase", DEBIAN_SUITE, rootfs, mirror])
        finally:
            _unmount_below(rootfs)
        # what Docker's debian images also leave out: downloaded .debs, apt
        # lists, device nodes (the runtime provides /dev), logs of the build
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists", "dev"):
            for child in (rootfs / sub).iterdir() if (rootfs / sub).is_dir() else []:
                if child.is_dir() and not child.is_symlink():
                    if child.name != "partial":
                        shutil.rmtree(child)
                else:
                    child.unlink()
        with contextlib.suppress(FileNotFoundError):
            (rootfs / "var/log/bootstrap.log").unlink()
        run(
            [
                "umoci",
                "repack",
                "--history.created_by",
                f"debootstrap --variant=minbase {DEBIAN_SUITE}",
                "--image",
                f"{out}:{TAG}",
                bundle,
            ]
        )
        run(
            [
                "umoci",
                "config",
                "--image",
                f"{out}:{TAG}",
                "--no-history",
                "--architecture",
                "amd64",
                "--os",
                "linux",
                "--config.env",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--config.cmd",
                "/bin/bash",
            ]
        )
        run(["umoci", "gc", "--layout", out])

    return cached_layout("debian", key, build)


def build_sized_layout(mib: int) -> Path:
    """The busybox image plus one layer holding ``/data/blob``: ``mib`` MiB of
    incompressible (seeded pseudo-random, reproducible) bytes.  For benches that
    need images of a given size (e.g. 10, 100, 1024)."""
    if not 0 < mib <= 8192:
        raise ValueError(f"size {mib} MiB out of range 1..8192")
    base = build_busybox_layout()
    key = recipe_key("sized", "1", base.name, str(mib))

    def build(out: Path) -> None:
        import random

        shutil.copytree(base, out)
        bundle = out.parent / "bundle"
        run(["umoci", "unpack", "--image", f"{out}:{TAG}", bundle])
        data = bundle / "rootfs" / "data"
        data.mkdir(mode=0o755)
        rng = random.Random(mib)
        with open(data / "blob", "wb") as f:
            for _ in range(mib):
                f.write(rng.randbytes(1 << 20))
        run(
            [
                "umoci",
                "repack",
                "--history.created_by",
                f"{mib} MiB of random data",
                "--image",
                f"{out}:{TAG}",
                bundle,
            ]
        )
        run(["umoci", "gc", "--layout", out])
        (out / ".ember-recipe").unlink(missing_ok=True)

    return cached_layout(f"sized-{mib}m", key, build)


def build_docker_archive(layout_builder: Callable[[], Path] = build_busybox_layout) -> Path:
    """A ``docker save``-style tarball (``docker-archive:``, Docker schema 2
    config, tag ``localhost/ember-test:latest``) of a cached single-platform layout."""
    src = layout_builder()
    tag = "localhost/ember-test:latest"
    key = recipe_key("docker-archive", src.name, tag)

    def build(out: Path) -> None:
        # the cache holds directories: the archive is out/image.tar, and an
        # (empty) OCI layout marker is not wanted, so check for the tar instead
        out.mkdir()
        run(
            [
                "skopeo",
                "copy",
                "--quiet",
                layout_ref(src),
                f"docker-archive:{out / 'image.tar'}:{tag}",
            ]
        )

    return cached_layout("docker-archive", key, build, is_complete=_has_archive) / "image.tar"


def _has_archive(path: Path) -> bool:
    return (path / "image.tar").is_file()


# --------------------------------------------------------------------------- registry


def push_layout(
    layout: Path,
    registry: Registry,
    repo: str,
    tag: str = TAG,
    creds: str | None = None,
    *,
    src_tag: str = TAG,
    format: str | None = None,
) -> str:
    """Copy ``layout:src_tag`` to ``registry/repo:tag`` with skopeo (all platforms,
    digests preserved); returns the pushed reference ``HOST/REPO:TAG``.

    ``creds`` (``user:password``) defaults to the registry's own credentials.
    ``format="v2s2"`` converts to Docker schema 2 media types on the way (then
    the digests change: ask the registry for them).
    """
    ref = f"{registry.host}/{repo}:{tag}"
    cmd = ["skopeo", "copy", "--quiet", "--all", "--dest-tls-verify=false"]
    cmd += ["--format", format] if format else ["--preserve-digests"]
    creds = creds or registry.creds
    if creds:
        cmd += ["--dest-creds", creds]
    run([*cmd, layout_ref(layout, src_tag), f"docker://{ref}"])
    return ref


def layer_digests(layout: Path) -> list[Digest]:
    """The layer digests of the first image in the OCI layout ``layout``."""
    index = json.loads((layout / "index.json").read_text())
    algorithm, hex_ = index["manifests"][0]["digest"].split(":")
    manifest = json.loads((layout / "blobs" / algorithm / hex_).read_text())
    return [Digest.parse(layer["digest"]) for layer in manifest["layers"]]
