"""AHN self-distillation trainer (`python -m ahn_runtime.train --help`): frozen base, teacher = full attention,
student = sinks + sliding window + AHN memory, loss = KL(teacher || student) (spec §4.2, §7)."""
from .forward import Distiller
from .trainer import TrainConfig, Trainer, export_ahn, run, sample_geometry

__all__ = ["Distiller", "TrainConfig", "Trainer", "export_ahn", "run", "sample_geometry"]
