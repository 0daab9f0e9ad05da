"""The upload check's fast path accepts only lines that the full checks find valid."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from tuneloom.trainer.datafile import Example, iter_checked
from tuneloom.trainer.quickcheck import quick_check

USER = {"role": "user", "content": "q"}
ASSISTANT = {"role": "assistant", "content": "a"}
MESSAGES = [
    USER,
    ASSISTANT,
    {"role": "system", "content": "s"},
    {"role": "assistant", "content": "a", "weight": 0},
    {"role": "assistant", "content": "a", "weight": 1},
    {"role": "user", "content": "q", "weight": 1},
    {"role": "assistant", "content": "a", "weight": 2},
    {"role": "assistant", "content": "a", "weight": True},
    {"role": "assistant", "content": "a", "weight": 1.0},
    {"role": "assistant", "content": "a", "weight": None},
    {"role": "assistant", "content": " \u3000 "},
    {"role": "assistant", "content": ""},
    {"role": "assistant", "content": ["a"]},
    {"role": "assistant"},
    {"role": "robot", "content": "a"},
    {"content": "a"},
    {"role": "assistant", "content": "a", "name": "x"},
    {"role": "assistant", "content": "\ud800"},
    "a message",
]
RAW_LINES = [
    '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "x": NaN}',
    '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "x": 1e999}',
    '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "x": "\t"}',
    '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "x": 01}',
    '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]} trailing',
    '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "role": "assistant", "content": "a"}]}',
    '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "role": "user"}]}',
    '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "messages": []}',
    '[{"role": "assistant", "content": "a"}]',
    '{"prompt": "q", "completion": "a"}',
]


def _lines() -> list[bytes]:
    records = [
        {"messages": list(conversation)} for n in range(4) for conversation in itertools.product(MESSAGES, repeat=n)
    ]
    records += [{"messages": [USER, ASSISTANT], "id": 7, "meta": {"k": [1, None]}}, {"messages": "hi"}]
    lines = [
        json.dumps(record, ensure_ascii=ascii).encode("utf-8", "surrogatepass")
        for record in records
        for ascii in (True, False)
    ]
    lines += [line.encode() for line in RAW_LINES]
    lines.append(
        b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "x": "\xff"}'
    )
    return lines


def test_the_fast_path_accepts_only_lines_the_checks_find_valid(tmp_path: Path) -> None:
    quick = quick_check("chat")
    assert quick is not None
    lines = _lines()
    path = tmp_path / "lines.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    checked: dict[int, list] = {}
    for item in iter_checked(path, "chat"):
        checked.setdefault(item.line, []).append(item)
    accepted = [number for number, line in enumerate(lines, 1) if quick(line)]
    for number in accepted:
        assert [type(item) for item in checked[number]] == [Example], lines[number - 1]
    valid = [number for number, items in checked.items() if [type(item) for item in items] == [Example]]
    # The fast path takes every valid line but those that only json reads (NaN, lone surrogates).
    only_json = [n for n in valid if b"NaN" in lines[n - 1] or b"\\ud800" in lines[n - 1]]
    assert sorted(set(valid) - set(only_json)) == accepted and only_json and len(valid) < len(lines) / 2
    assert [item if isinstance(item, int) else item.line for item in iter_checked(path, "chat", quick=quick)] == [
        item.line for items in checked.values() for item in items
    ]
