"""How the CLI reports: one-line failures on stderr, problem lists, exit codes.

Used by every verb of the `orch` command.
"""

from __future__ import annotations

import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3


def fail(message: str, code: int) -> int:
    print(f"orch: {message}", file=sys.stderr)
    return code


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def print_problems(folder: Path, problems: list[str]) -> int:
    print(f"{folder}: {len(problems)} problem{'s' if len(problems) != 1 else ''}", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    return EXIT_FAILED
