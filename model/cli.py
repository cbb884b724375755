"""The command line of every script: its signature is the CLI, and a user mistake is one `error:` line.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable


def run_cli(function: Callable, args: list[str] | None = None) -> Any:
    """Run `function` as a command line (its signature is the CLI, its docstring the help).

    A user mistake (a missing file, a bad value) prints one clear `error:` line and exits with status 1 instead of
    a traceback; set FORGE_DEBUG=1 to see the traceback.
    """
    from jsonargparse import CLI

    try:
        return CLI(function, args=args, as_positional=False)
    except (FileNotFoundError, ValueError, NotADirectoryError, FileExistsError) as e:
        if os.environ.get("FORGE_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
