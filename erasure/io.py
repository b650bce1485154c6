"""Atomic writes: a reader never sees a half-written file or folder."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` by rename.

    If the body raises, the temporary folder is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the result gets a plain folder's mode
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, retired / target.name)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, target)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    atomic_save(path, lambda staging: staging.write_text(text))


def atomic_save(path: Path, save: Callable[[Path], object]) -> None:
    """Call ``save(staging)`` on a temporary file beside ``path`` (same suffix), then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        save(staging)
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def atomic_save_tensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors through a temporary file and a rename (:func:`stream_safetensors`)."""
    atomic_save(path, lambda staging: stream_safetensors(tensors, staging, metadata))


SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                      "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def stream_safetensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` in the safetensors format (an 8-byte little-endian header length, a JSON header of
    dtypes, shapes and byte offsets padded to 8 bytes, then the data), one tensor at a time: memory beyond
    the tensors themselves is one tensor's contiguous copy at most, where ``safetensors.torch.save_file``
    first builds the bytes of all of them (twice the model's trained weights at real sizes)."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[str(tensor.dtype).removeprefix("torch.")],
                        "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for tensor in tensors.values():
            data = tensor.detach().cpu().contiguous()
            handle.write(memoryview(data.view(-1).view(torch.uint8).numpy()) if data.numel() else b"")
