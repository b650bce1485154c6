"""Erasure methods: one LightningModule subclass of :class:`EraserModule` per file, and those of
the installed plug-ins (``erasure.methods`` entry points, :mod:`erasure.plugins`)."""

from erasure.methods.base import EraserModule, MethodConfig
from erasure.methods.ablation import Ablation
from erasure.methods.advunlearn import AdvUnlearn
from erasure.methods.esd import ESD
from erasure.methods.instruction import Instruction
from erasure.methods.mace import MACE
from erasure.methods.rece import RECE
from erasure.methods.safree import SAFREE
from erasure.methods.sld import SLD
from erasure.methods.speed import SPEED
from erasure.methods.uce import UCE
from erasure.plugins import plugins

METHODS: dict[str, type[EraserModule]] = {cls.name: cls for cls in (ESD, Ablation, UCE, Instruction, SLD, RECE, AdvUnlearn, SPEED, SAFREE, MACE)}
METHODS |= plugins("erasure.methods", METHODS)

__all__ = ["METHODS", "EraserModule", "MethodConfig"]
