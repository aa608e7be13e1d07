"""Selectors: which module paths a part takes, written as patterns with exclusions.

A selector string is a comma-separated list of :mod:`lorakit.targets` patterns (exact path, dotted suffix, glob,
``re:<regex>``); a pattern starting with ``!`` excludes. ``"layer.*.attention.**, !layer.0.**"`` takes the attention
modules of every layer but the first. A selector with only exclusions takes everything else.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lorakit.errors import TargetError
from lorakit.targets import check_pattern, matches


@dataclass(frozen=True)
class Selector:
    """Include and exclude patterns over module paths.

    Attributes:
        include: a path is taken if it matches one of these (or if there are none).
        exclude: a path matching one of these is never taken.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for p in (*self.include, *self.exclude):
            check_pattern(p)

    @classmethod
    def parse(cls, spec: str) -> Selector:
        """``"a, b, !c"`` → ``Selector(include=("a", "b"), exclude=("c",))``.

        Commas inside a ``re:`` pattern are not supported; use several patterns instead.
        """
        items = [s.strip() for s in spec.split(",") if s.strip()]
        if not items:
            raise TargetError(f"empty selector {spec!r}")
        inc = tuple(s for s in items if not s.startswith("!"))
        exc = tuple(s[1:].strip() for s in items if s.startswith("!"))
        return cls(inc, exc)

    def __str__(self) -> str:
        return ",".join([*self.include, *(f"!{p}" for p in self.exclude)])

    def __call__(self, path: str) -> bool:
        if any(matches(p, path) for p in self.exclude):
            return False
        return not self.include or any(matches(p, path) for p in self.include)

    def select(self, paths: Iterable[str]) -> list[str]:
        """The paths this selector takes, in the given order."""
        return [p for p in paths if self(p)]
