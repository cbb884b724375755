"""The command line of every script: its signature is the CLI, and a user mistake is one `error:` line.
"""

from __future__ import annotations

import inspect
import os
import sys
from typing import Any, Callable

# flags that scripts used to take, and what replaces them: an old command line fails with this line instead of
# jsonargparse's list of every flag
REMOVED_FLAGS = {
    "lora_dir": "pass the run directory as --checkpoint_dir",
    "adapter_dir": "pass the run directory as --checkpoint_dir",
    "csv_file": "pass the CSV file as --data_file",
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

    A user mistake (a missing file, a bad value) prints one clear `error:` line and exits with status 1 instead of
    a traceback; set FORGE_DEBUG=1 to see the traceback.
    """
    from jsonargparse import CLI

    try:
        check_removed_flags(function, sys.argv[1:] if args is None else args)
        return CLI(function, args=args, as_positional=False)
    except (FileNotFoundError, ValueError, NotADirectoryError, FileExistsError) as e:
        if os.environ.get("FORGE_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
