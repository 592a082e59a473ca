"""draftforge: train EAGLE-3 speculative-decoding draft models for Hugging Face LLMs."""

from __future__ import annotations

import importlib
from types import ModuleType

# The one place the version lives: pyproject.toml reads it from here (`dynamic = ["version"]`).
__version__ = "0.1.0"


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require_extra(module: str, extra: str, needed_by: str) -> ModuleType:
    """Import ``module``, an optional dependency, or raise a one-line :class:`MissingExtraError`
    saying that ``needed_by`` needs it and which ``draftforge[extra]`` installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"{needed_by} needs {module}: pip install 'draftforge[{extra}]'"
        ) from None
