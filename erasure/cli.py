"""The shared shape of the command-line entry points: help, one-line errors, exit codes."""

from __future__ import annotations

import sys
from collections.abc import Callable

from erasure.bundle import ModelLoadError
from erasure.config import ConfigError
from erasure.weights import DeltaError
from evaluation.attacks import AttackConfigError

BAD_INPUT = (ConfigError, ModelLoadError, DeltaError, AttackConfigError)  # exit code 2


def run_command(help_text: str, action: Callable[[list[str]], object], argv: list[str] | None,
                exit_codes: dict[type[BaseException], tuple[int, str]] | None = None) -> int:
    """Run ``action(arguments)``; bad input prints ``error: <one line>`` and returns 2, the
    exceptions in ``exit_codes`` print ``<prefix>: <one line>`` and return their code."""
    arguments = sys.argv[1:] if argv is None else argv
    if not arguments or any(a in ("-h", "--help", "help") for a in arguments):
        print(help_text)
        return 0 if arguments else 2
    codes = {error: (2, "error") for error in BAD_INPUT} | (exit_codes or {})
    try:
        action(arguments)
    except tuple(codes) as error:
        code, prefix = next(value for kind, value in codes.items() if isinstance(error, kind))
        print(f"{prefix}: {error}", file=sys.stderr)
        return code
    return 0
