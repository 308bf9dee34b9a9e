"""User-facing errors of the app services: str(error) is shown to the user as it is."""
from __future__ import annotations


class ServiceError(Exception):
    """Something the user must be told; the app keeps working."""


class Cancelled(ServiceError):
    """The user pressed Stop (or went away) before the work finished."""


class Busy(ServiceError):
    """This chat is already busy with another request."""


class BudgetExceeded(ServiceError):
    """Full attention cannot hold the documents (and the conversation)."""


class OutOfMemory(ServiceError):
    """The device ran out of memory; that request's buffers were freed."""


class ModeUnavailable(ServiceError):
    """The mode cannot be used with the loaded model (e.g. AHN without AHN weights)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM (torch.OutOfMemoryError) or an allocator failure on CPU."""
    try:
        import torch
        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc).lower()
        return ("out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg
                or "failed to allocate" in msg)
    return False
