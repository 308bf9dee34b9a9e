"""AHN runtime: sliding-window attention + sinks + a recurrent memory (Artificial Hippocampus Networks)."""
from .errors import AHNError
from .loading import load_model
from .model import AHNModel, RuntimeConfig
from .planning import AHNMemoryError, plan_memory
from .state import SequenceState, StateSpec

__all__ = ["AHNError", "AHNMemoryError", "AHNModel", "RuntimeConfig", "SequenceState", "StateSpec", "load_model",
           "plan_memory"]
