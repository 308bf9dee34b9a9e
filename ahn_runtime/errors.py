class AHNError(ValueError):
    """A user-facing error: bad model path, mismatched checkpoint, invalid setting or input."""
