"""Erasure methods: one LightningModule subclass of :class:`EraserModule` per file."""

from erasure.methods.base import EraserModule, MethodConfig
from erasure.methods.esd import ESD

METHODS: dict[str, type[EraserModule]] = {cls.name: cls for cls in (ESD,)}

__all__ = ["METHODS", "EraserModule", "MethodConfig"]
