"""Error types. Every error lorakit raises on bad input is a :class:`LorakitError`.

Messages name the offending file, key, module, shape or option, and when several things are wrong at once the
error lists all of them (collect, then raise once), so a user fixes a file in one pass.
"""

from __future__ import annotations

from collections.abc import Sequence


class LorakitError(Exception):
    """Base class of every error lorakit raises on bad input or bad use."""


class AdapterValidationError(LorakitError):
    """Adapter data is inconsistent: shapes, dtypes, ranks or values (NaN/inf)."""

    def __init__(self, problems: Sequence[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{lines}")


class FileFormatError(LorakitError):
    """A file cannot be read: missing, truncated, bad header, wrong layout."""

    def __init__(self, path: object, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class FormatVersionError(FileFormatError):
    """A lorakit file written by a newer (or unknown) format version."""


class TargetError(LorakitError):
    """A target pattern is invalid or matches no module."""


class AttachError(LorakitError):
    """An adapter does not fit a model: missing modules, wrong layer kind or shape."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"adapter does not fit the model, {len(self.problems)} mismatch(es):\n{lines}")


class AdapterStateError(LorakitError):
    """An operation that the adapter's current state forbids (unknown name, training a merged adapter...)."""
