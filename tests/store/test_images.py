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


def test_a_damaged_row_is_a_clear_error_and_can_be_forgotten(tmp_path: Path, busybox_layout: Path) -> None:
    """A row whose time or size is not what ember wrote made every image command a
    ValueError traceback, ``image rm`` of it included."""
    import sqlite3

    import pytest

    from ember.home import Home
    from ember.images import ImageService
    from ember.store.errors import DamagedImageRecord

    home = Home(tmp_path / "home")
    service = ImageService(home)
    ref = f"oci:{busybox_layout}:latest"
    service.pull(ref, progress=False)
    with sqlite3.connect(home.db_path) as conn:
        conn.execute("UPDATE images SET created_at = 'yesterday', size = 'big'")
    with pytest.raises(DamagedImageRecord, match="is damaged") as e:
        service.get(ref)
    assert e.value.hint is not None and "ember image rm" in e.value.hint
    with pytest.raises(DamagedImageRecord):
        service.list()
    service.remove(ref)  # forgotten; its blobs are left to ember gc
    assert service.list() == []
    service.pull(ref, progress=False)
    assert [r.reference for r in service.list()] == [service.get(ref).reference]


def test_a_damaged_stored_manifest_is_fetched_again(tmp_path: Path, busybox_layout: Path) -> None:
    """A manifest or config blob changed on disk made every command say "manifest is not
    valid JSON", and pulling again changed nothing (the store skips blobs it has)."""
    import pytest

    from ember.home import Home
    from ember.images import ImageService
    from ember.images.errors import ImageNotFound

    service = ImageService(Home(tmp_path / "home"))
    ref = f"oci:{busybox_layout}:latest"
    image = service.pull(ref, progress=False)
    for digest in (image.manifest_digest, image.config_digest):
        blob = service.content.path(digest)
        blob.chmod(0o644)
        blob.write_bytes(b"{}")
        with pytest.raises(ImageNotFound, match="no longer matches its digest") as e:
            service.get(ref)
        assert e.value.hint == f"pull it again: ember image pull {image.reference}"
        assert not blob.exists()
        service.pull(ref, progress=False)
        assert service.get(ref).manifest_digest == image.manifest_digest
