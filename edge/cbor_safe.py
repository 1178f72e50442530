"""Bounded CBOR decoding for input from outside: the frame is checked before cbor2 builds it.

cbor2 builds whatever a frame describes: tags become datetimes, bignums,
regular expressions or e-mail messages; string references (tags 25/256) and
shared values (28/29) decode small but expand without bound when the value is
encoded again (a 700 KB down message expands to 32 GB in cbor2.dumps, which
aborts the whole process once memory runs out); and 1 MiB of empty arrays is
70 MB of lists.
`check` walks the heads of the frame first, without building anything and
without recursion, and refuses, with the kind the counters count:

- `cbor_depth`   arrays, maps, tags and indefinite strings nested deeper than `max_depth`;
- `cbor_items`   more than `max_items` data items (keys, values and chunks each count);
- `cbor_length`  a declared length beyond the bytes that remain (a 4 GB string in 21 bytes,
                 an array of 2^63 items in 9);
- `cbor_tag`     any tag but those in `tags` (none by default; one leading self-describe
                 tag 55799 is skipped);
- `cbor_key`     a map key that is an array, map or tag, or the same text, byte string or
                 integer key twice;
- `cbor_invalid` anything else that is not plain CBOR: a truncated frame, a reserved head,
                 a break out of place, a simple value other than false/true/null, bytes
                 after the item, or what cbor2 itself refuses (text that is not UTF-8).

Only a frame that passes reaches cbor2, so what it builds is at most `max_items`
plain values (numbers, strings, lists, dicts with hashable keys), `max_depth` deep.
"""

from __future__ import annotations

from typing import Any

import cbor2

from edge.errors import CborError

__all__ = [
    "DEPTH",
    "INVALID",
    "ITEMS",
    "KEY",
    "KINDS",
    "LENGTH",
    "MAX_DEPTH",
    "MAX_ITEMS",
    "TAG",
    "check",
    "loads",
]

MAX_DEPTH = 64
MAX_ITEMS = 100_000  # at worst (empty maps) about 7 MB of Python objects

DEPTH, ITEMS, LENGTH, TAG, KEY, INVALID = (
    "cbor_depth", "cbor_items", "cbor_length", "cbor_tag", "cbor_key", "cbor_invalid")
KINDS = (DEPTH, ITEMS, LENGTH, TAG, KEY, INVALID)

_SELF_DESCRIBE = b"\xd9\xd9\xf7"  # tag 55799: "this is CBOR", nothing more
_ARG_BYTES = (1, 2, 4, 8)  # additional information 24..27
_SIMPLE_OK = (20, 21, 22, 25, 26, 27)  # false, true, null, half, single, double floats
_INDEFINITE = -1
_NAMES = ("unsigned integer", "negative integer", "byte string", "text string", "array",
          "map", "tag", "simple value")
_A_NAME = tuple(("an " if name[0] in "aeiou" else "a ") + name for name in _NAMES)


def loads(data: bytes, *, max_depth: int = MAX_DEPTH, max_items: int = MAX_ITEMS,
          tags: frozenset[int] = frozenset()) -> Any:
    """Check `data` (see the module's docstring), then decode it; CborError if refused."""
    if data[:3] == _SELF_DESCRIBE:
        data = data[3:]
    check(data, max_depth=max_depth, max_items=max_items, tags=tags)
    try:
        return cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several unrelated types on bad input
        raise CborError(INVALID, f"CBOR not valid: {exc}") from exc


def check(data: bytes, *, max_depth: int = MAX_DEPTH, max_items: int = MAX_ITEMS,
          tags: frozenset[int] = frozenset()) -> None:
    """Walk the heads of one CBOR item filling `data`; CborError at the first thing refused."""
    end = len(data)
    pos = 0
    items = 0
    # One frame per open container: [left, major, keys]. `major` is 2 or 3 for the chunks
    # of an indefinite string, 4 array, 5 map, 6 tag; `keys` the keys a map has had.
    # `left` counts the items still to come, down to 0; an indefinite-length container
    # (ended by a break) counts down from -1 instead, so it never reaches 0. In a map a
    # key comes next when `left` is even (definite) or odd (indefinite).
    stack: list[list[Any]] = []
    top: list[Any] | None = None  # stack[-1]
    while True:
        if pos >= end:
            raise CborError(INVALID, f"CBOR ends early, at byte {pos}")
        head = data[pos]
        at = pos
        pos += 1
        if head == 0xFF:  # break: ends the innermost indefinite-length item
            if top is None or top[0] >= 0:
                raise CborError(INVALID, f"CBOR break code out of place at byte {at}")
            if top[1] == 5 and not top[0] & 1:
                raise CborError(INVALID, f"CBOR map ends after a key, at byte {at}")
            stack.pop()
        else:
            items += 1
            if items > max_items:
                raise CborError(ITEMS, f"CBOR holds more than {max_items} items")
            major = head >> 5
            info = head & 0x1F
            if info < 24:
                arg = info
            elif info < 28:
                size = _ARG_BYTES[info - 24]
                if pos + size > end:
                    raise CborError(INVALID, f"CBOR ends early, in the head at byte {at}")
                arg = data[pos] if size == 1 else int.from_bytes(data[pos:pos + size], "big")
                pos += size
            elif info == 31 and 2 <= major <= 5:
                arg = _INDEFINITE
            else:
                raise CborError(INVALID, f"CBOR head 0x{head:02x} at byte {at} is reserved"
                                         " or not valid")
            if top is not None:
                if top[1] == 5:
                    if (top[0] & 1) == (top[0] < 0):  # a key
                        if major == 3 and arg != _INDEFINITE:  # text, the usual key: inline
                            key = data[pos:pos + arg]
                            if key in top[2]:
                                _twice(key, at)
                            top[2].add(key)
                        else:
                            _key(top[2], major, arg, data, pos, at)
                elif top[1] < 4 and (major != top[1] or arg == _INDEFINITE):
                    raise CborError(INVALID, f"CBOR indefinite-length {_NAMES[top[1]]} holds"
                                             f" {_A_NAME[major]} at byte {at}")
            if major < 2:
                pass
            elif major < 4:
                if arg == _INDEFINITE:
                    top = _open(stack, [-1, major, None], max_depth, at)
                    continue
                if arg > end - pos:
                    raise CborError(LENGTH, f"CBOR {_NAMES[major]} at byte {at} claims"
                                            f" {arg} bytes but {end - pos} remain")
                pos += arg
            elif major < 6:
                if arg == _INDEFINITE:
                    top = _open(stack, [-1, major, set() if major == 5 else None], max_depth, at)
                    continue
                if arg:
                    need = arg if major == 4 else 2 * arg  # each item is a byte at least
                    if need > end - pos:
                        unit = "items" if major == 4 else "pairs"
                        raise CborError(LENGTH, f"CBOR {_NAMES[major]} at byte {at} claims"
                                                f" {arg} {unit} but {end - pos} bytes remain")
                    top = _open(stack, [need, major, set() if major == 5 else None], max_depth,
                                at)
                    continue
            elif major == 6:
                if arg not in tags:
                    raise CborError(TAG, f"CBOR tag {arg} at byte {at} not allowed")
                top = _open(stack, [1, 6, None], max_depth, at)
                continue
            elif info not in _SIMPLE_OK:
                raise CborError(INVALID, f"CBOR simple value {arg} at byte {at} not allowed"
                                         " (only false, true, null and floats)")
        # An item ended: count it in its container, and close the containers it fills.
        while stack:
            top = stack[-1]
            top[0] -= 1
            if top[0]:
                break
            stack.pop()
        else:
            break
    if pos != end:
        raise CborError(INVALID, f"CBOR item ends at byte {pos} of {end}: bytes after it")


def _open(stack: list[list[Any]], frame: list[Any], max_depth: int, at: int) -> list[Any]:
    """Push the frame of a container whose items come next, unless it is one too deep."""
    if len(stack) >= max_depth:
        raise CborError(DEPTH, f"CBOR nesting deeper than {max_depth} at byte {at}")
    stack.append(frame)
    return frame


def _key(keys: set[Any], major: int, arg: int, data: bytes, pos: int, at: int) -> None:
    """Refuse a map key that is a container or tag, or one the map has had already.

    `keys` holds text keys as their bytes, byte-string keys as ("b", bytes) and
    integer keys as ints: no two kinds can be equal.
    """
    if major >= 4 and major != 7:
        raise CborError(KEY, f"CBOR map key at byte {at} is {_A_NAME[major]}: only numbers,"
                             " strings and simple values may be keys")
    key: Any
    if major == 0:
        key = arg
    elif major == 1:
        key = -1 - arg
    elif major == 2 and arg != _INDEFINITE:
        key = ("b", data[pos:pos + arg])
    elif major == 3 and arg != _INDEFINITE:
        key = data[pos:pos + arg]
    else:
        return  # floats, simple values, chunked strings: left to cbor2 (last one wins)
    if key in keys:
        _twice(key, at)
    keys.add(key)


def _twice(key: Any, at: int) -> None:
    if isinstance(key, tuple):
        shown = repr(bytes(key[1]))
    elif isinstance(key, bytes):
        shown = repr(key.decode("utf-8", "replace"))
    else:
        shown = str(key)
    raise CborError(KEY, f"CBOR map has the key {shown[:80]} twice (at byte {at})")
