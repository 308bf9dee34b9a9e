"""AHN runtime: sliding-window attention + sinks + a recurrent memory (Artificial Hippocampus Networks)."""
from .errors import AHNError
from .loading import load_model
from .model import AHNModel, RuntimeConfig
from .state import SequenceState, StateSpec

__all__ = ["AHNError", "AHNModel", "RuntimeConfig", "SequenceState", "StateSpec", "load_model"]
