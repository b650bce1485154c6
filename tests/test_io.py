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


def test_streamed_safetensors_read_back_equal_with_their_metadata(tmp_path):
    """stream_safetensors writes what the safetensors library reads: every dtype, odd shapes, a scalar, an
    empty tensor and a non-contiguous view, with the metadata."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from erasure.io import stream_safetensors

    generator = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=generator), "bf16": torch.randn(7, generator=generator).bfloat16(),
               "f16": torch.randn(2, 2, 2, generator=generator).half(), "i64": torch.arange(5),
               "u8": torch.arange(9, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "view": torch.randn(4, 6, generator=generator).T}
    stream_safetensors(tensors, tmp_path / "t.safetensors", {"method": "esd", "concepts": "circle"})
    loaded = load_file(tmp_path / "t.safetensors")
    assert set(loaded) == set(tensors)
    assert all(loaded[k].dtype == v.dtype and torch.equal(loaded[k], v) for k, v in tensors.items())
    with safe_open(tmp_path / "t.safetensors", "pt") as handle:
        assert handle.metadata() == {"method": "esd", "concepts": "circle"}
