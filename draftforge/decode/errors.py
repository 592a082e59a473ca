"""The one error type of the speculative-decoding package."""


class DecodeError(ValueError):
    """A setting, prompt or target the engine cannot use; the message says what to change."""
