"""Untrusted JSON, read one way: size and nesting depth bounded before parsing, every field checked after.

Every JSON text lorakit reads from a file (the native header, PEFT's ``adapter_config.json``, diffusers'
``lora_adapter_metadata``, the ``lorakit.extras`` hints, the split manifest, the safetensors header itself) goes
through :func:`parse` and a small schema (:class:`Str`, :class:`Int`, :class:`Num`, :class:`Bool`, :class:`List`,
:class:`Map`, :class:`Obj`, :class:`Opt`, :class:`Check`), so a malformed but parseable file ends in one
:class:`FileFormatError` that names the file and each offending key, never in a ``TypeError`` three calls later or
a silent misreading:

* types are strict: the string ``"false"`` is not a boolean, ``true`` is not a number, ``"16"`` is not an integer;
* numbers are finite (``NaN`` / ``Infinity`` are not JSON and are refused while parsing), integers bounded;
* a text nested deeper than :data:`MAX_DEPTH` is refused by a bracket scan *before* ``json.loads``, which would
  otherwise recurse into ``RecursionError``; texts over the size limit are refused unread;
* duplicate keys in one object are refused (``json.loads`` keeps the last one silently) and so are strings holding
  lone UTF-16 surrogates (``"\\ud800"``), which no file name or UTF-8 metadata can carry.

:func:`check_tensor_table` applies the same care to a safetensors tensor table: dtype names, shapes, offsets, and
the byte size each shape implies.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from lorakit.errors import FileFormatError

#: Deepest nesting of arrays and objects accepted; lorakit's own files nest at most 5 levels.
MAX_DEPTH = 32
#: Largest JSON text accepted by default (a manifest or config is a few kB; a 10,000-module header about 2 MB).
MAX_JSON_BYTES = 16_000_000
#: Largest integer accepted where a count or size belongs (ranks, shapes, byte offsets).
MAX_INT = 2 ** 53
#: Problems listed in one error message at most (the rest are counted).
MAX_LISTED = 12

_BRACKETS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _depth_exceeds(text: str, limit: int) -> bool:
    """Whether arrays/objects in ``text`` nest deeper than ``limit`` (brackets inside strings do not count)."""
    if text.count("[") + text.count("{") <= limit:  # cheap exit for the common small document
        return False
    depth = 0
    for m in _BRACKETS.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > limit:
                return True
        elif c in "]}":
            depth -= 1
    return False


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    return out


def _has_lone_surrogate(value) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    return False


def parse(text: str | bytes, source: object, what: str, *, max_bytes: int = MAX_JSON_BYTES,
          max_depth: int = MAX_DEPTH) -> object:
    """Parse untrusted JSON ``text`` with size, depth and strictness limits.

    Args:
        text: the JSON text (bytes are decoded as UTF-8).
        source: the file it came from, for the error message.
        what: what the text is (``"adapter_config.json"``, ``"metadata 'lorakit'"``), for the error message.
        max_bytes: longest text accepted.
        max_depth: deepest nesting of arrays/objects accepted.

    Raises:
        FileFormatError: too large, too deep, not UTF-8, not valid JSON, NaN/Infinity, a duplicate key, a lone
            surrogate, or an integer of more digits than Python converts.
    """
    if len(text) > max_bytes:
        raise FileFormatError(source, f"{what}: {len(text):,} bytes of JSON is over the limit of {max_bytes:,}")
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise FileFormatError(source, f"{what}: not UTF-8 text ({e})") from None
    if _depth_exceeds(text, max_depth):
        raise FileFormatError(source, f"{what}: JSON nested deeper than {max_depth} levels")
    try:
        value = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_no_duplicates)
    except ValueError as e:  # JSONDecodeError, the refusals above, and int() digit limits
        raise FileFormatError(source, f"{what}: not valid JSON ({e})") from None
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise FileFormatError(source, f"{what}: a string holds a lone UTF-16 surrogate (\\ud800-\\udfff)")
    return value


# ------------------------------------------------------------------------------------------------------- schemas
def _show(value) -> str:
    """How a wrong value is named in a message: its JSON type and a short excerpt."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"the string {value[:40]!r}" + ("..." if len(value) > 40 else "")
    if isinstance(value, (int, float)):
        text = repr(value)
        return f"the number {text[:40]}" + ("..." if len(text) > 40 else "")
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return f"an object of {len(value)} key(s)"
    return type(value).__name__


def _at(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    plain = re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) is not None
    return (f"{where}.{key}" if where else key) if plain else f"{where}[{key!r}]"


class Schema:
    """A check of one JSON value; :meth:`problems` names each offending place with ``where``."""

    def problems(self, value, where: str) -> list[str]:
        raise NotImplementedError

    def _wrong(self, value, where: str, expected: str) -> list[str]:
        return [f"{where or 'the document'}: expected {expected}, got {_show(value)}"]


@dataclass(frozen=True)
class Any_(Schema):
    """Anything parseable."""

    def problems(self, value, where: str) -> list[str]:
        return []


@dataclass(frozen=True)
class Str(Schema):
    """A string, optionally non-empty, of bounded length, one of ``choices`` or matching ``pattern`` in full."""

    nonempty: bool = False
    max_len: int | None = None
    choices: Sequence[str] | None = None
    pattern: str | None = None

    def problems(self, value, where: str) -> list[str]:
        if not isinstance(value, str):
            return self._wrong(value, where, "a string")
        if self.choices is not None and value not in self.choices:
            return self._wrong(value, where, "one of " + ", ".join(map(repr, self.choices)))
        if self.nonempty and not value:
            return self._wrong(value, where, "a non-empty string")
        if self.max_len is not None and len(value) > self.max_len:
            return self._wrong(value, where, f"a string of at most {self.max_len} characters")
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            return self._wrong(value, where, f"a string matching {self.pattern!r}")
        return []


@dataclass(frozen=True)
class Int(Schema):
    """A JSON integer (not a boolean, not ``2.0``) in ``[lo, hi]``."""

    lo: int = -MAX_INT
    hi: int = MAX_INT

    def problems(self, value, where: str) -> list[str]:
        if not isinstance(value, int) or isinstance(value, bool):
            return self._wrong(value, where, "an integer")
        if not self.lo <= value <= self.hi:
            return self._wrong(value, where, f"an integer in [{self.lo}, {self.hi}]")
        return []


@dataclass(frozen=True)
class Num(Schema):
    """A finite JSON number (not a boolean) in ``[lo, hi]``; ``positive`` excludes 0 and below."""

    lo: float = -math.inf
    hi: float = math.inf
    positive: bool = False

    def problems(self, value, where: str) -> list[str]:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return self._wrong(value, where, "a number")
        try:
            x = float(value)
        except OverflowError:
            x = math.inf
        if not math.isfinite(x):
            return self._wrong(value, where, "a finite number")
        if self.positive and x <= 0:
            return self._wrong(value, where, "a number > 0")
        if not self.lo <= x <= self.hi:
            return self._wrong(value, where, f"a number in [{self.lo:g}, {self.hi:g}]")
        return []


@dataclass(frozen=True)
class Bool(Schema):
    """A JSON ``true`` / ``false``; the strings ``"true"`` / ``"false"`` and the numbers 0 / 1 are refused."""

    def problems(self, value, where: str) -> list[str]:
        return [] if isinstance(value, bool) else self._wrong(value, where, "true or false")


@dataclass(frozen=True)
class Opt(Schema):
    """``null`` or a value of ``schema``."""

    schema: Schema

    def problems(self, value, where: str) -> list[str]:
        return [] if value is None else self.schema.problems(value, where)


@dataclass(frozen=True)
class List(Schema):
    """A list of ``item`` values, of length in ``[min_len, max_len]``, optionally without repeats."""

    item: Schema = field(default_factory=Any_)
    min_len: int = 0
    max_len: int | None = None
    unique: bool = False

    def problems(self, value, where: str) -> list[str]:
        if not isinstance(value, list):
            return self._wrong(value, where, "a list")
        if len(value) < self.min_len or (self.max_len is not None and len(value) > self.max_len):
            size = f"{self.min_len}" if self.max_len == self.min_len else f"{self.min_len}..{self.max_len or 'any'}"
            return self._wrong(value, where, f"a list of {size} item(s)")
        out = [p for i, v in enumerate(value) for p in self.item.problems(v, _at(where, i))]
        if self.unique and not out:
            seen = set()
            for i, v in enumerate(value):
                key = json.dumps(v, sort_keys=True)
                if key in seen:
                    out.append(f"{_at(where, i)}: {_show(v)} appears twice")
                seen.add(key)
        return out


@dataclass(frozen=True)
class Map(Schema):
    """A JSON object with free keys (each checked by ``key``) and values of ``value``."""

    value: Schema = field(default_factory=Any_)
    key: Schema = field(default_factory=Str)

    def problems(self, value, where: str) -> list[str]:
        if not isinstance(value, dict):
            return self._wrong(value, where, "an object")
        out = []
        for k, v in value.items():
            out += [f"{p} (a key)" for p in self.key.problems(k, _at(where, k))]
            out += self.value.problems(v, _at(where, k))
        return out


@dataclass(frozen=True)
class Obj(Schema):
    """A JSON object with known fields: ``required`` ones must be present, ``optional`` ones may be; other keys
    are left alone (foreign configs carry many fields lorakit does not use)."""

    required: Mapping[str, Schema] = field(default_factory=dict)
    optional: Mapping[str, Schema] = field(default_factory=dict)

    def problems(self, value, where: str) -> list[str]:
        if not isinstance(value, dict):
            return self._wrong(value, where, "an object")
        out = [f"{_at(where, k)}: missing" for k in self.required if k not in value]
        for k, schema in (*self.required.items(), *self.optional.items()):
            if k in value:
                out += schema.problems(value[k], _at(where, k))
        return out


@dataclass(frozen=True)
class Check(Schema):
    """``schema`` followed by a custom test ``test(value) -> message or None`` run only when ``schema`` passed."""

    schema: Schema
    test: Callable[[object], str | None]

    def problems(self, value, where: str) -> list[str]:
        out = self.schema.problems(value, where)
        if not out and (msg := self.test(value)) is not None:
            out.append(f"{where or 'the document'}: {msg}")
        return out


def regex_keys(value: dict) -> str | None:
    """Test for :class:`Check`: every key of an object is a valid, unambiguous regular expression (PEFT's
    patterns)."""
    for k in value:
        try:
            with warnings.catch_warnings():  # "possible nested set": ambiguous, and the library never warns on input
                warnings.simplefilter("error", FutureWarning)
                re.compile(k)
        except (re.error, RecursionError, OverflowError, FutureWarning) as e:
            return f"key {k[:60]!r} is not a valid regular expression ({e})"
    return None


def problems_text(problems: Sequence[str]) -> str:
    """``problems`` joined for one message, at most :data:`MAX_LISTED` of them."""
    shown = "; ".join(problems[:MAX_LISTED])
    return shown + (f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else "")


def check(value, schema: Schema, source: object, what: str):
    """Return ``value`` if it passes ``schema``, else raise one :class:`FileFormatError` listing every problem."""
    problems = schema.problems(value, "")
    if problems:
        raise FileFormatError(source, f"{what}: {problems_text(problems)}")
    return value


def load(text: str | bytes, schema: Schema, source: object, what: str, **limits):
    """:func:`parse` then :func:`check`: the one way lorakit reads an untrusted JSON text."""
    return check(parse(text, source, what, **limits), schema, source, what)


def load_file(path: os.PathLike, schema: Schema, what: str, *, max_bytes: int = MAX_JSON_BYTES):
    """:func:`load` on the contents of the JSON file ``path``, whose size is checked before it is read.

    Raises:
        FileFormatError: the file is missing or unreadable (also when it vanishes between a check and the read, as
            under a directory swap), too large, or its JSON fails :func:`load`.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise FileFormatError(path, f"{what}: {size:,} bytes of JSON is over the limit of {max_bytes:,}")
            raw = f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise FileFormatError(path, f"{what}: no such file") from None
    except OSError as e:
        raise FileFormatError(path, f"{what}: cannot read ({e.strerror or e})") from None
    return load(raw, schema, path, what, max_bytes=max_bytes)


# ------------------------------------------------------------------------------------------ safetensors headers
#: Bytes per element of each safetensors dtype name.
ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
              "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}

_ENTRY = Obj(required={"dtype": Str(choices=tuple(ITEM_BYTES)),
                       "shape": List(Int(0, MAX_INT), max_len=8),
                       "data_offsets": List(Int(0, MAX_INT), min_len=2, max_len=2)})


def check_tensor_table(header: Mapping, data_bytes: int, source: object) -> None:
    """Check a parsed safetensors header (tensor table plus ``__metadata__``) against the file's data section.

    Every entry needs a known dtype, a shape of non-negative integers and integer ``data_offsets`` ``[start,
    end]`` with ``end - start`` equal to the bytes its shape and dtype imply; the entries must tile the data
    section exactly (as safetensors itself requires). So every shape is bounded by the file size before any tensor
    is allocated.

    Raises:
        FileFormatError: listing every bad entry by key.
    """
    if not isinstance(header, Mapping):
        raise FileFormatError(source, "bad header: not a JSON object")
    problems = []
    meta = header.get("__metadata__")
    if meta is not None:
        problems += Map(Str()).problems(meta, "__metadata__")
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        found = _ENTRY.problems(info, f"tensor {key!r}")
        if found:
            problems += found
            continue
        start, end = info["data_offsets"]
        need = math.prod(info["shape"]) * ITEM_BYTES[info["dtype"]]
        if end - start != need:
            problems.append(f"tensor {key!r}: shape {info['shape']} of {info['dtype']} needs {need} bytes but "
                            f"data_offsets {[start, end]} hold {end - start}")
            continue
        if end > data_bytes:
            problems.append(f"truncated: tensor {key!r} needs bytes {start}..{end} of the data section but the "
                            f"file holds {data_bytes}")
            continue
        spans.append((start, end, key))
    if not problems:
        at = 0
        for start, end, key in sorted(spans):
            if start != at:
                problems.append(f"tensor {key!r}: data_offsets start at {start}, expected {at} (tensors must "
                                f"tile the data section without gaps or overlaps)")
                break
            at = end
        else:
            if at != data_bytes:
                problems.append(f"tensors cover {at} bytes but the data section holds {data_bytes} (trailing "
                                f"bytes)")
    if problems:
        raise FileFormatError(source, f"bad safetensors header: {problems_text(problems)}")


def check_safetensors_header(raw: bytes, data_bytes: int, source: object, max_bytes: int) -> dict:
    """Parse and check the JSON header of a safetensors file (see :func:`check_tensor_table`); returns it."""
    header = parse(raw, source, "safetensors header", max_bytes=max_bytes)
    check_tensor_table(header, data_bytes, source)
    return header
