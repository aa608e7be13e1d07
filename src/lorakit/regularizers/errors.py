"""The error type of the regularisers: bad options, missing optional dependencies, unknown tap paths."""

from __future__ import annotations

from lorakit.errors import LorakitError


class RegularizerError(LorakitError):
    """A regulariser cannot run as asked; the message names the option, path or package at fault."""
