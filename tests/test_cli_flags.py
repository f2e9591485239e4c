"""The CLI's flags come from the config dataclasses, and every flag takes a SWARM_<FLAG> default."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from swarm_node.choices import CODECS
from swarm_node.node.apps.cli import build_parser
from swarm_node.node.apps.commands import flag_values
from swarm_node.node.config import (
    DEFAULT_MODEL,
    ApiConfig,
    ClientConfig,
    PeerConfig,
    ServerConfig,
    count_or_auto,
)


def flags() -> list[tuple[str, argparse.Action]]:
    """(command, action) for every flag of every command; "" for the top-level ones."""
    parser = build_parser()
    out = [("", a) for a in parser._actions if a.option_strings and a.dest != "help"]
    for sub in parser._actions:
        if isinstance(sub, argparse._SubParsersAction):
            for command, p in sub.choices.items():
                out += [(command, a) for a in p._actions if a.option_strings and a.dest != "help"]
    return out


def argv(command: str, action: argparse.Action) -> list[str]:
    """The command line that parses with nothing but what ``action``'s variable supplies."""
    if not command:
        return ["keygen", "--swarm-key", "k"]
    if command == "serve" and action.dest not in ("blocks", "num_blocks"):
        return ["serve", "--blocks", "0:1"]
    return [command, "hi"] if command == "generate" else [command]


def env_name(action: argparse.Action) -> str:
    match = re.search(r"env (SWARM_[A-Z_]+)\)", action.help or "")
    assert match, f"{action.option_strings} help names no SWARM_* variable: {action.help!r}"
    return match.group(1)


def sample(action: argparse.Action) -> tuple[str, object]:
    """An environment value for ``action`` and the value it must arrive as."""
    if isinstance(
        action, argparse.BooleanOptionalAction
    ):  # on by default: the variable turns it off
        return ("no", False)
    if action.nargs == 0:  # store_true / count
        return ("yes", True) if action.const is True else ("2", 2)
    if action.choices:
        one = list(action.choices)[-1]
        return one, [one] if action.nargs == "+" else one
    kind = action.type or str
    samples = {int: ("7", 7), float: ("0.5", 0.5), Path: ("k.key", Path("k.key"))}
    samples[count_or_auto] = ("auto", "auto")
    raw, value = samples.get(kind, ("abc", "abc"))
    return (f"{raw} {raw}", [value, value]) if action.nargs == "+" else (raw, value)


def test_every_flag_takes_its_environment_default(monkeypatch: pytest.MonkeyPatch) -> None:
    walked = flags()
    assert len(walked) >= 70
    for command, action in walked:
        raw, expected = sample(action)
        with monkeypatch.context() as env:
            env.setenv(env_name(action), raw)
            args = build_parser().parse_args(argv(command, action))
        assert getattr(args, action.dest) == expected, (command, action.option_strings)


def test_a_bad_environment_value_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = {int: "an int", float: "a number"}
    checked = 0
    for command, action in flags():
        if action.type in bad:
            raw, expect = "abc", f"must be {bad[action.type]}, got 'abc'"
        elif (
            action.choices
            or action.const is True
            or isinstance(action, argparse.BooleanOptionalAction)
        ):
            raw, expect = "bogus", "must be one of"
        else:
            continue
        with monkeypatch.context() as env:
            env.setenv(env_name(action), raw)
            with pytest.raises(SystemExit) as exit:
                build_parser().parse_args(argv(command, action))
        assert exit.value.code == 2
        assert f"{env_name(action)} {expect}" in capsys.readouterr().err
        checked += 1
    assert checked >= 30
    monkeypatch.setenv("SWARM_MAX_ATTEMPTS", "abc")  # only generate has the flag, and it wins
    assert build_parser().parse_args(["generate", "hi", "--max-attempts", "3"]).max_attempts == 3
    assert build_parser().parse_args(["serve", "--blocks", "0:1"]).blocks == "0:1"


def test_environment_below_flags_and_lists_split_on_spaces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARM_INITIAL_PEERS", "/ip4/1.2.3.4/tcp/1/p2p/A /ip4/1.2.3.4/tcp/2/p2p/B")
    monkeypatch.setenv("SWARM_CACHE_TOKENS", "512")
    monkeypatch.setenv("SWARM_NUM_BLOCKS", "4")  # satisfies serve's --blocks | --num-blocks
    args = build_parser().parse_args(["serve", "--cache-tokens", "1024"])
    assert args.initial_peers == ["/ip4/1.2.3.4/tcp/1/p2p/A", "/ip4/1.2.3.4/tcp/2/p2p/B"]
    assert (args.cache_budget_tokens, args.num_blocks, args.blocks) == (1024, 4, None)


def test_flag_defaults_are_the_configs_defaults() -> None:
    parse = build_parser().parse_args
    serve = parse(["serve", "--blocks", "0:1"])
    assert ServerConfig(**flag_values(ServerConfig, serve), start=0, end=1) == ServerConfig(
        model=DEFAULT_MODEL, start=0, end=1
    )
    assert PeerConfig(**flag_values(PeerConfig, serve)) == PeerConfig(
        listen=("/ip4/0.0.0.0/tcp/0",)
    )
    assert ClientConfig(**flag_values(ClientConfig, parse(["generate", "hi"]))) == ClientConfig()
    assert ApiConfig(**flag_values(ApiConfig, parse(["api"]))) == ApiConfig()
    for codec in CODECS:
        assert parse(["generate", "hi", "--compression", codec]).compression == codec
        assert parse(["serve", "--blocks", "0:1", "--compression", codec]).compression == codec


def test_help_imports_no_torch_or_libp2p() -> None:
    code = (
        "import sys; from swarm_node.node.apps.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'libp2p', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


def test_every_flag_field_is_a_flag_of_its_command() -> None:
    """A config field declared with flag() reaches the command line of the command it configures
    (a limit added to ServerConfig but not to `serve` is a limit nobody can set)."""
    commands = {"serve": ServerConfig, "generate": ClientConfig, "api": ApiConfig}
    dests = {command: {a.dest for c, a in flags() if c == command} for command in commands}
    for command, config in commands.items():
        for field in dataclasses.fields(config):
            if "help" in field.metadata:
                assert field.name in dests[command], (
                    f"{config.__name__}.{field.name} not in {command}"
                )
