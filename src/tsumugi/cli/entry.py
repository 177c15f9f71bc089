"""Running an entry script: logging set-up and one-line errors for bad input."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from tsumugi.errors import RunInterrupted, UserError


def run_main(body: Callable[[], int | None]) -> int:
    """Call ``body``; a :class:`UserError` becomes ``error: <message>`` on stderr and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return body() or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: aborted without saving", file=sys.stderr)
        return 130
