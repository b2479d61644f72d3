"""Stage-by-stage progress on stderr: what is running, and how long each stage took."""

from __future__ import annotations

import contextlib
import sys
import time


class Progress:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def stage(self, what: str):
        """Prints `what ...` now and `done (N s)` when the block ends."""
        start = time.perf_counter()
        if not self.quiet:
            print(f"  {what} ...", end="", file=sys.stderr, flush=True)
        try:
            yield
        except BaseException:
            if not self.quiet:
                print(" failed", file=sys.stderr, flush=True)
            raise
        if not self.quiet:
            print(f" done ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
