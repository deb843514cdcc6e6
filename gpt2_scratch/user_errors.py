"""The one root for errors in what the user gave, and the one runner for every command. Every part of the
project may import it (it imports nothing of the project), so the trainer, `data_prep`, `eval`, the
conversion commands and the benchmarks share it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn


class UserError(Exception):
    """An error in what the user gave (a config value, a file, a URL, an account): a command prints it
    as one `error:` line and exits with status 2, never as a traceback. Subclasses exist only where a
    caller tells them apart (a remote store that fails, HellaSwag data that is missing, ...); one whose
    outcome a script must tell apart sets its own `exit_status` (a diverged training run: 3)."""

    exit_status = 2


def check_at_least(values: dict[str, int | float], minimums: dict[str, int]) -> None:
    """Refuse, as one `UserError` naming each, the command-line flags (`--name`: value) below their minimum."""
    low = [f"{flag} must be >= {least}, got {values[flag]}" for flag, least in minimums.items() if values[flag] < least]
    if low:
        raise UserError("; ".join(low))


def run_command(main: Callable[..., Any], argv: list[str] | None = None) -> NoReturn:
    """Run a command's `main(argv)` and exit: a `UserError` is one `error: ...` line on stderr and exit
    status 2 (or the error's own `exit_status`); anything else is a bug and keeps its traceback (Python's
    exit status 1). A `main` that returns an int exits with it; any other result is success."""
    try:
        result = main(argv)
    except UserError as err:
        message = str(err).replace("\n", " ")
        print(f"error: {message}", file=sys.stderr)
        sys.exit(err.exit_status)
    sys.exit(result if type(result) is int else 0)
