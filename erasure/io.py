"""Atomic writes: a reader never sees a half-written file or folder."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


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
    """Write tensors as safetensors through a temporary file and a rename."""
    from safetensors.torch import save_file

    atomic_save(path, lambda staging: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                                                staging, metadata=metadata))
