"""The shared shape of the command-line entry points: help, one-line errors, exit codes, and the
console for the ``erasure`` loggers (progress on stdout, warnings on stderr)."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator

from erasure.bundle import ModelLoadError
from erasure.config import ConfigError
from erasure.weights import DeltaError
from evaluation.attacks import AttackConfigError

PACKAGES = ("erasure", "evaluation")  # the loggers a command shows
QUIETED = ("lightning.pytorch", "lightning.fabric")  # their info lines (accelerators found, tips) are not the user's
BAD_INPUT = (ConfigError, ModelLoadError, DeltaError, AttackConfigError)  # exit code 2


@contextlib.contextmanager
def console() -> Iterator[None]:
    """The ``erasure`` and ``evaluation`` loggers' records on the console while a command runs: below
    WARNING on stdout, the rest on stderr, as plain lines; Lightning's own info lines held back."""
    progress, warnings = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    progress.addFilter(lambda record: record.levelno < logging.WARNING)
    warnings.setLevel(logging.WARNING)
    loggers = [logging.getLogger(name) for name in PACKAGES]
    saved = [(logger.level, logger.propagate) for logger in loggers]
    quieted = [logging.getLogger(name) for name in QUIETED]
    quieted_levels = [logger.level for logger in quieted]
    for logger in quieted:
        logger.setLevel(logging.WARNING)
    for handler in (progress, warnings):
        handler.setFormatter(logging.Formatter("%(message)s"))
    for logger in loggers:
        logger.addHandler(progress)
        logger.addHandler(warnings)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        yield
    finally:
        for logger, (level, propagate) in zip(loggers, saved):
            logger.removeHandler(progress)
            logger.removeHandler(warnings)
            logger.setLevel(level)
            logger.propagate = propagate
        for logger, level in zip(quieted, quieted_levels):
            logger.setLevel(level)


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
        with console():
            action(arguments)
    except tuple(codes) as error:
        code, prefix = next(value for kind, value in codes.items() if isinstance(error, kind))
        print(f"{prefix}: {error}", file=sys.stderr)
        return code
    return 0
