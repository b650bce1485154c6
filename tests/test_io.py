import pytest

from erasure.io import atomic_directory, atomic_write_text


def test_atomic_directory_replaces_the_target_only_on_success(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "new.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    with atomic_directory(target) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_write_text(tmp_path):
    path = tmp_path / "a" / "metrics.json"
    atomic_write_text(path, "{}")
    assert path.read_text() == "{}" and [p.name for p in path.parent.iterdir()] == ["metrics.json"]
