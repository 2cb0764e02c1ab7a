"""Signals for the daemon, taken by its loop: SIGTERM/SIGINT/SIGHUP stop it, SIGUSR1 asks a
flush."""

from __future__ import annotations

import signal
from collections import deque
from dataclasses import dataclass
from types import FrameType

# A hangup (the terminal or ssh session `run` was started from going away) stops it too:
# left to its default, SIGHUP would end the daemon without a word and without a final flush.
STOPPING = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
HANDLED = (*STOPPING, signal.SIGUSR1)


@dataclass(frozen=True)
class Requests:
    flush: bool  # `spotwatch flush` asking; several asks, one flush
    stop: bool


class SignalInbox:
    """Invariant: a handler takes no lock. It runs on the main thread between any two
    bytecodes, also while the loop holds the lock of an Event or a Queue: taking that lock
    again would hang the daemon for good. So it only appends to a deque (no Python lock),
    and the loop takes what arrived within a tick."""

    def __init__(self) -> None:
        self._received: deque[int] = deque()

    def install(self, signals: tuple[int, ...] = HANDLED) -> None:
        for signum in signals:
            signal.signal(signum, self._remember)

    def install_flush_requests(self) -> None:
        """Invariant: from the moment the daemon takes the state lock, where `spotwatch flush`
        finds it, SIGUSR1 is a request the loop takes once it runs, never its default action
        (ending the daemon during its start-up, without a word). A stop meanwhile still ends
        it at once, as before it watches anything."""
        self.install((signal.SIGUSR1,))

    def _remember(self, signum: int, frame: FrameType | None) -> None:
        self._received.append(signum)

    def take(self) -> Requests:
        received = set()
        while self._received:
            received.add(self._received.popleft())
        return Requests(flush=signal.SIGUSR1 in received,
                        stop=bool(received & STOPPING))
