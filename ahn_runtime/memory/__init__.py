"""AHN memory modules by official `_ahn_implementation` name."""
from .base import GroupLinear, MemoryModule
from .delta import DeltaNet, GatedDeltaNet
from .mamba2 import Mamba2

VARIANTS: dict[str, type[MemoryModule]] = {m.variant: m for m in (GatedDeltaNet, DeltaNet, Mamba2)}

__all__ = ["VARIANTS", "GroupLinear", "MemoryModule", "GatedDeltaNet", "DeltaNet", "Mamba2"]
