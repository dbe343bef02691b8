"""The README documents what exists: every config key, the two commands, every CLI command."""
import dataclasses
import typing
from pathlib import Path

from expertpar.app.cli import _parser
from expertpar.config import Config

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_every_config_key_is_in_the_reference():
    missing = [k for k in _keys(Config) if f"`{k}`" not in README]
    assert not missing, f"README's config reference lacks {missing}"


def test_the_two_commands_and_every_cli_command_are_documented():
    assert "make demo" in README and "make test" in README
    sub = next(a for a in _parser()._actions if a.dest == "command")
    for name in sub.choices:
        assert f"expertpar {name}" in README, name
