"""What every command line does with a user's mistake: one line saying what is wrong and what to do.

A traceback is for bugs; ``--debug`` (or ``ORTHSERVE_DEBUG=1``) shows it for user errors too.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn

from .artifact import ArtifactError
from .errors import WeightsUnavailableError


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (data, flags, weights, files), not a bug."""
    return ValueError, FileNotFoundError, NotADirectoryError, WeightsUnavailableError, ArtifactError


def run(main: Callable[[], object], prog: str) -> NoReturn:
    """``sys.exit(main())``, with user errors as ``prog: error: message`` (exit 2) unless debugging."""
    debug = "--debug" in sys.argv[1:] or bool(os.environ.get("ORTHSERVE_DEBUG"))
    try:
        result = main()
    except KeyboardInterrupt:
        sys.exit(f"{prog}: interrupted")
    except user_errors() as err:
        if debug:
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(result if isinstance(result, int) else 0)


def add_debug_flag(parser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default in ``--help``."""


def warn_random_weights(pretrained: str | None, log) -> None:
    if pretrained == "none":
        log.warning("random weights (--pretrained none): fine for smoke tests and timing, meaningless for accuracy")
