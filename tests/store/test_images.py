from pathlib import Path

from ember.oci.digest import Digest
from ember.store.images import ImageTable, open_image_db

M1, M2, C = (Digest.of(x) for x in (b"m1", b"m2", b"c"))


def test_put_get_replace_list_delete(tmp_path: Path) -> None:
    table = ImageTable(open_image_db(tmp_path / "db.sqlite"))
    assert table.get("x") is None and table.list() == []
    first = table.put(
        "docker.io/library/a:1",
        manifest_digest=M1,
        config_digest=C,
        media_type="m",
        platform="linux/amd64",
        size=10,
    )
    assert first.manifest_digest == M1 and first.index_digest is None
    assert first.created_at.tzinfo is not None
    second = table.put(
        "docker.io/library/a:1",
        manifest_digest=M2,
        config_digest=C,
        media_type="m",
        platform="linux/arm64",
        size=20,
        index_digest=M1,
    )
    assert second.manifest_digest == M2 and second.index_digest == M1
    assert second.created_at == first.created_at  # a re-pull moves the name, keeps its age
    table.put(
        "b", manifest_digest=M1, config_digest=C, media_type="m", platform="linux/amd64", size=1
    )
    assert [r.reference for r in table.list()] == ["b", "docker.io/library/a:1"]
    assert [r.reference for r in table.find_by_digest(M2.hex[:8])] == ["docker.io/library/a:1"]
    assert [r.reference for r in table.find_by_digest(str(M1))] == ["b"]
    assert table.find_by_digest("%") == []
    assert table.delete("b") and not table.delete("b")
    assert table.get("b") is None
    assert table.get("docker.io/library/a:1") is not None
    assert second.as_dict()["manifest_digest"] == str(M2)


def test_reading_a_fresh_store_creates_no_database(tmp_path: Path) -> None:
    path = tmp_path / "ember.db"
    table = ImageTable(open_image_db(path))
    assert table.get("docker.io/library/busybox:latest") is None
    assert table.list() == []
    assert table.find_by_digest("abcdef") == []
    assert not path.exists()
