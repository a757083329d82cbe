"""Frozen dataclass <-> int64 words, driven by the field annotations, in field order: int, bool,
IntEnum and Enum (its place) one word; float its float64 bits (bit-exact); X | None presence,
then X; str its UTF-8 bytes; tuples a length and the items; nested dataclasses their fields."""

from __future__ import annotations

import dataclasses
import enum
import functools
import struct
import typing
from collections.abc import Callable, Sequence
from typing import Any

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


class ProtocolError(ValueError):
    """A tensor that is not a well-formed message; the message says which and where."""


def float_to_word(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def word_to_float(w: int) -> float:
    return struct.unpack("<d", struct.pack("<q", w))[0]


class Writer:
    """Appends a message's words to `words`; `label` (the message kind) names it in errors."""

    def __init__(self, label: str, words: list[int]) -> None:
        self.label, self.words = label, words

    def int(self, x: int) -> None:
        if not isinstance(x, int) or not INT64_MIN <= x <= INT64_MAX:
            raise ProtocolError(f"{self.label}: {x!r} is not an int64")
        self.words.append(x)


class Reader:
    """Reads `words` from `pos` on; every read past the end is a ProtocolError naming `label`."""

    def __init__(self, label: str, words: list[int], pos: int = 0) -> None:
        self.label, self.words, self.pos = label, words, pos

    def int(self) -> int:
        if self.pos >= len(self.words):
            raise ProtocolError(
                f"{self.label} message truncated: needs word {self.pos}, has {len(self.words)}")
        self.pos += 1
        return self.words[self.pos - 1]

    def count(self) -> int:
        """A list's length word, checked against what is left of the message."""
        n = self.int()
        if not 0 <= n <= len(self.words) - self.pos:
            raise ProtocolError(f"{self.label} message truncated: list of {n} at word "
                                f"{self.pos}, message has {len(self.words)} words")
        return n


_Write = Callable[[Writer, Any], None]
_Read = Callable[[Reader], Any]


def _write_float(w: Writer, x: float) -> None:
    w.words.append(float_to_word(float(x)))


def _read_enum(cls: type[enum.IntEnum]) -> _Read:
    def read(r: Reader) -> enum.IntEnum:
        code = r.int()
        try:
            return cls(code)
        except ValueError:
            raise ProtocolError(f"{r.label}: {code} is not a {cls.__name__}") from None
    return read


def _read_member(cls: type[enum.Enum], members: list[enum.Enum]) -> _Read:
    def read(r: Reader) -> enum.Enum:
        i = r.int()
        if not 0 <= i < len(members):
            raise ProtocolError(f"{r.label}: {i} is not a {cls.__name__}")
        return members[i]
    return read


def _write_ints(w: Writer, xs: Sequence[int]) -> None:
    w.words.append(len(xs))
    for x in xs:
        w.int(x)


def _read_ints(r: Reader) -> tuple[int, ...]:
    n = r.count()
    r.pos += n
    return tuple(r.words[r.pos - n:r.pos])


def _write_str(w: Writer, s: str) -> None:
    _write_ints(w, list(s.encode("utf-8")))


def _read_str(r: Reader) -> str:
    raw = _read_ints(r)
    if any(not 0 <= b < 256 for b in raw):
        raise ProtocolError(f"{r.label}: text is not bytes")
    return bytes(raw).decode("utf-8", errors="replace")


@functools.cache
def codec(tp: Any) -> tuple[_Write, _Read]:
    """(write, read) for one annotated type; built once per type."""
    if tp is bool:
        return (lambda w, x: w.int(int(x))), (lambda r: bool(r.int()))
    if tp is int:
        return Writer.int, Reader.int
    if tp is float:
        return _write_float, (lambda r: word_to_float(r.int()))
    if tp is str:
        return _write_str, _read_str
    if isinstance(tp, type) and issubclass(tp, enum.IntEnum):
        return (lambda w, x: w.int(int(x))), _read_enum(tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):  # its place among the members
        members = list(tp)
        return (lambda w, x: w.int(members.index(x))), _read_member(tp, members)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        parts = [(f.name, *codec(hints[f.name])) for f in dataclasses.fields(tp)]

        def write(w: Writer, obj: Any) -> None:
            for name, wr, _ in parts:
                wr(w, getattr(obj, name))

        def read(r: Reader) -> Any:
            return tp(*(rd(r) for _, _, rd in parts))
        return write, read
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis:
        if args[0] is int:
            return _write_ints, _read_ints
        item_write, item_read = codec(args[0])

        def write_seq(w: Writer, xs: Sequence[Any]) -> None:
            w.words.append(len(xs))
            for x in xs:
                item_write(w, x)
        return write_seq, (lambda r: tuple(item_read(r) for _ in range(r.count())))
    if len(args) == 2 and type(None) in args:  # X | None: presence, then X if present
        w_x, r_x = codec(next(a for a in args if a is not type(None)))

        def write_opt(w: Writer, x: Any) -> None:
            w.words.append(0 if x is None else 1)
            if x is not None:
                w_x(w, x)
        return write_opt, (lambda r: r_x(r) if r.int() else None)
    raise TypeError(f"no wire codec for {tp!r}")
