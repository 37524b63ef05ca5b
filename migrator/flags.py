"""The command line's conventions: typed flag values, and every flag's environment variable.

Precedence, for every flag of every job command: the flag, else its environment
variable, else the manifest, else the default. The variable of `--tps-limit` is
`MIGRATOR_TPS_LIMIT`: the long name upper-cased, `-` as `_`, after `MIGRATOR_`. A
switch (`--dry-run`) takes 1/true/yes/on or 0/false/no/off.

The environment is applied to a parser as the defaults of its flags, just before it
parses: a flag given on the command line still wins, and a bad value is reported
naming the variable. Nothing here imports more than argparse.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from migrator import __version__

T = TypeVar("T")
ENV_PREFIX = "MIGRATOR_"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class EnvironmentValueError(ValueError):
    """A MIGRATOR_* variable holds a value its flag does not take; `str()` names it."""


def env_name(action: argparse.Action) -> str | None:
    """`--tps-limit` -> `MIGRATOR_TPS_LIMIT`; None for positionals, --help and --version."""
    if isinstance(action, argparse._HelpAction | argparse._VersionAction | VersionAction):
        return None
    longs = [o for o in action.option_strings if o.startswith("--")]
    if not longs:
        return None
    return ENV_PREFIX + longs[0][2:].upper().replace("-", "_")


@dataclass(frozen=True, slots=True)
class FromEnvironment:
    """What the environment gave a parser: `names` {dest: variable} of every value, and
    `lists` {dest: (default, [value])} for repeatable flags, which `fill` applies after
    parsing only where no flag was given (argparse would append flags to a default)."""

    names: dict[str, str] = field(default_factory=dict)
    lists: dict[str, tuple[object, list[object]]] = field(default_factory=dict)

    def fill(self, namespace: argparse.Namespace) -> None:
        for dest, (default, values) in self.lists.items():
            if getattr(namespace, dest, default) == default:
                setattr(namespace, dest, values)


def apply_environment(
    parser: argparse.ArgumentParser, environ: Mapping[str, str]
) -> FromEnvironment:
    """Make each flag's variable, when set, the flag's default (an empty one is not set).
    Raises EnvironmentValueError for a value the flag would refuse."""
    given = FromEnvironment()
    for action in parser._actions:
        name = env_name(action)
        if name is None or not environ.get(name, "").strip():
            continue
        value = _env_value(action, name, environ[name])
        if isinstance(action, argparse._AppendAction):
            given.lists[action.dest] = (action.default, [value])
        else:
            action.default = value
        action.required = False  # `--dest` given by MIGRATOR_DEST
        given.names[action.dest] = name
    return given


def _env_value(action: argparse.Action, name: str, text: str) -> object:
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        return action.const if switch(text, name) else action.default
    return _converted(action, name, text, action.type)


def _converted(action: argparse.Action, name: str, text: str, convert: object) -> object:
    try:
        value = convert(text) if callable(convert) else text
    except argparse.ArgumentTypeError as err:
        raise EnvironmentValueError(f"{name}: {err}") from None
    except (ValueError, TypeError):
        raise EnvironmentValueError(f"{name}: {text!r} is not a valid value") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise EnvironmentValueError(f"{name}: {text!r} is not one of {choices}")
    return value


def switch(text: str, name: str) -> bool:
    """A switch's value in the environment: 1/true/yes/on or 0/false/no/off (any case)."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise EnvironmentValueError(
        f"{name}: {text!r} is not a switch (use 1/true/yes/on or 0/false/no/off)"
    )


def typed(parse: Callable[[str], T]) -> Callable[[str], T]:
    """`parse` as an argparse `type`: its ValueError's reason becomes the error message."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An argparse `type`: a whole number from `low` to `high`."""

    def convert(text: str) -> int:
        try:
            number = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {number}")
        return number

    return convert


def version_text() -> str:
    """migrator's version, and the Python and aiohttp it runs on (aiohttp not imported)."""
    import platform
    from importlib import metadata  # not before: every command would pay for it

    try:
        aiohttp = metadata.version("aiohttp")
    except metadata.PackageNotFoundError:
        aiohttp = "not installed"
    return (
        f"migrator {__version__}\n"
        f"Python {platform.python_version()} ({platform.python_implementation()})\n"
        f"aiohttp {aiohttp}"
    )


class VersionAction(argparse.Action):
    """`--version`: the versions are looked up only when asked for."""

    def __init__(
        self, option_strings: list[str], dest: str = argparse.SUPPRESS, help: str | None = None
    ) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(version_text())
        parser.exit()
