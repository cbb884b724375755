"""The command line of every script: its signature is the CLI, and a user mistake is one `error:` line.

Numbers are checked where they enter: annotate a flag with `PositiveInt` (batch sizes, steps, intervals, lengths,
top-k) or `NonNegativeInt` (warmup steps) and a value out of range is refused, naming the flag, before the script
runs.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import sys
from typing import Any, Callable

from jsonargparse.typing import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
)

__all__ = ["run_cli", "Interrupted", "PositiveInt", "NonNegativeInt", "PositiveFloat", "NonNegativeFloat"]

_RESTRICTIONS = {"v>0": "a positive", "v>=0": "a non-negative"}


class Interrupted(Exception):
    """A run stopped by the user (Ctrl-C, SIGTERM) after saving what it needs to continue: one line, exit 130."""


# flags that scripts used to take, and what replaces them: an old command line fails with this line instead of
# jsonargparse's list of every flag
REMOVED_FLAGS = {
    "lora_dir": "pass the run directory as --checkpoint_dir",
    "adapter_dir": "pass the run directory as --checkpoint_dir",
    "csv_file": "pass the CSV file as --data_file",
    "output_dir": "pass the output directory as --out_dir",
}


def check_removed_flags(function: Callable, args: list[str]) -> None:
    """Raise ValueError naming the new flag when `args` use a flag that was removed (and `function` does not take)."""
    parameters = inspect.signature(function).parameters
    for arg in args:
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
        if name in REMOVED_FLAGS and name not in parameters:
            raise ValueError(f"--{name} was removed: {REMOVED_FLAGS[name]}")


def run_cli(function: Callable, args: list[str] | None = None) -> Any:
    """Run `function` as a command line (its signature is the CLI, its docstring the help).

    A user mistake (a missing file, a bad value, a flag out of range) prints one clear `error:` line and exits with
    status 1 instead of a traceback; set FORGE_DEBUG=1 to see the traceback.
    """
    from jsonargparse import CLI

    try:
        check_removed_flags(function, sys.argv[1:] if args is None else args)
        return CLI(function, args=args, as_positional=False, exit_on_error=False)
    except argparse.ArgumentError as e:
        _fail(argument_error(str(e)))
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        raise SystemExit(130) from None
    except (FileNotFoundError, ValueError, NotADirectoryError, FileExistsError) as e:
        if os.environ.get("FORGE_DEBUG"):
            raise
        _fail(str(e))


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1) from None


def argument_error(message: str) -> str:
    """jsonargparse's multi-line report of a bad flag, as one line: `--max_steps must be a positive integer, got 0`."""
    key = re.search(r'Parser key "([^"]+)"', message)
    if key is None:
        return f"{' '.join(message.split())} (see --help)"
    flag = f"--{key.group(1)}"
    restriction = re.search(r"Not of type (\w+): (?:(.*?) )?does not conform to restriction (\S+)", message)
    given = re.search(r"Given value: (.*)", message)
    if restriction is not None:
        kind, value, rule = restriction.groups()
        value = given.group(1).strip() if given else value
        what = _RESTRICTIONS.get(rule, f"satisfying {rule}:")
        number = "integer" if "Int" in kind else "number"
        return f"{flag} must be {what} {number}, got {value}"
    got = given.group(1).strip() if given else None
    details = [line.strip(" -") for line in message.splitlines()[1:] if line.strip()]
    reason = next((d for d in details if d.startswith(("Not of type", "Expected"))), details[-1] if details else "")
    if ". Got value: " in reason:
        reason, got = reason.split(". Got value: ", 1)
    choices = re.match(r"Expected a typing\.Literal\[(.*)\]$", reason)
    if choices is not None:
        reason = f"must be one of {choices.group(1).replace(chr(39), '')}"
    else:
        reason = re.sub(r"Expected a <class '(\w+)'>", r"must be a \1", reason)
    return f"{flag}: {reason}" + (f", got {got}" if got is not None else "")
