"""A chat line told valid in C (msgspec decodes it straight into typed structs), for an upload's
check, which only counts valid lines: most lines of a real file take this path, at a fraction of
the Python checks' cost.

It may only accept lines that `datafile`'s checks find no problem in; anything it does not accept
goes through those checks, which name the problems. So the typed shape below is narrower than what
they allow (an int weight only, no NaN, no lone surrogates), never wider.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import msgspec

from tuneloom.trainer.datafile import ROLES


class _Message(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal[ROLES]  # type: ignore[valid-type]
    content: str
    weight: Literal[0, 1] | msgspec.UnsetType = msgspec.UNSET


class _Chat(msgspec.Struct):  # other top-level keys are ignored, as the checks ignore them
    messages: list[_Message]


_decode_chat = msgspec.json.Decoder(_Chat).decode


def _valid_chat(raw: bytes) -> bool:
    # msgspec checks UTF-8 only in the values it keeps; the checks refuse it anywhere in the line.
    if not raw.isascii():
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return False
    try:
        messages = _decode_chat(raw).messages
    except msgspec.DecodeError:  # ValidationError is one: a line of another shape
        return False
    if not messages or messages[-1].role != "assistant":
        return False
    learned = False  # an assistant message with weight 1 (unset is 1)
    for message in messages:
        # `isspace` is `not strip()` without the copy: str.strip removes exactly what isspace matches.
        if not message.content or message.content.isspace():
            return False
        if message.role == "assistant":
            learned = learned or message.weight != 0
        elif message.weight is not msgspec.UNSET:
            return False
    return learned


def quick_check(fmt: str) -> Callable[[bytes], bool] | None:
    """The fast test for lines of `fmt` that are valid, where there is one."""
    return _valid_chat if fmt == "chat" else None
