"""A progress bar on one terminal line, rewritten as work is done; silent when not a TTY."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

from spotwatch.console import one_line

# What a transfer reports its bytes to as they move (negative: taken back after a retry).
Progress = Callable[[int], None]

WIDTH = 24
# Redraw at most this often: a callback per 256 KiB chunk would flood the terminal.
REDRAW_SECONDS = 0.1


class ProgressBar:
    def __init__(self, label: str, total: int) -> None:
        self._label = one_line(label)
        self._total = total
        self._done = 0
        self._files = 0
        self._lock = threading.Lock()
        self._drawn_at = 0.0
        self.enabled = sys.stderr.isatty()

    def __call__(self, amount: int) -> None:
        """Count bytes done (the signature boto3's transfer Callback expects)."""
        with self._lock:
            self._done += amount
            self._draw()

    def file_done(self) -> None:
        with self._lock:
            self._files += 1
            self._draw()

    def grow_to(self, total: int) -> None:
        """More work appeared (files settling during a flush)."""
        with self._lock:
            self._total = max(self._total, total)

    def close(self) -> None:
        if self.enabled:
            with self._lock:
                self._draw(force=True)
            print(file=sys.stderr)

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._drawn_at < REDRAW_SECONDS):
            return
        self._drawn_at = now
        total = max(self._total, self._done, 1)
        filled = round(WIDTH * self._done / total)
        files = f", {self._files} files" if self._files else ""
        print(f"\r{self._label}: [{'#' * filled}{'.' * (WIDTH - filled)}] "
              f"{self._done / 2**20:8.1f} / {total / 2**20:.1f} MiB "
              f"({100 * self._done / total:5.1f}%){files}",
              end="", file=sys.stderr, flush=True)
