"""The product CLI and the subcommands other distributions contribute through its entry points."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from tuneloom import cli


def _entry_points_returning(*entries: EntryPoint):
    return lambda group: [entry for entry in entries if entry.group == group]


def test_dev_tools_add_their_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args(["dev", "cluster", "env", "--help"])
    assert exited.value.code == 0
    assert "--state-dir" in capsys.readouterr().out


@pytest.mark.parametrize("words", [["cluster", "up"], ["--help"], []])
def test_dev_without_the_dev_tools_says_how_to_install_them(
    words: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "entry_points", _entry_points_returning())
    assert cli.main(["dev", *words]) == 2
    assert "pip install -e ./dev" in capsys.readouterr().err


def test_a_broken_contribution_leaves_the_product_commands(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = EntryPoint(name="x", value="tuneloom_no_such_module:add_commands", group=cli.COMMANDS_GROUP)
    monkeypatch.setattr(cli, "entry_points", _entry_points_returning(broken))
    args = cli.build_parser().parse_args(["models", "prepare", "smollm2-135m-instruct"])
    assert args.handler is not None
    assert "tuneloom_no_such_module:add_commands not loaded" in capsys.readouterr().err
