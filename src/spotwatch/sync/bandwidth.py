"""A cap on upload bandwidth that a notice lifts at once.

In continuous mode spotwatch uploads while the trainer runs, and the trainer may need the
network too (data loading, collectives). BandwidthLimiter is a token bucket shared by every
upload of a store: a sender calls acquire(n) before n bytes go out and is held until the
bucket allows them. lift() suspends the cap, waking every sender held right now, so a flush
(and everything still in flight) runs at full speed at once; reimpose() brings it back.

It knows nothing of S3: a store applies it where file bytes are read for sending (see
aws.store for s3transfer's read path and the single PutObject).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# The bucket holds this fraction of a second's bytes: short bursts, a smooth rate.
BURST_SECONDS = 0.125
MIN_BURST = 64 * 1024
# How often a sender held by the cap looks whether its upload was cancelled meanwhile.
CANCEL_CHECK_SECONDS = 0.05


class BandwidthLimiter:
    """Invariant: while not lifted, the bytes let through in any window of t seconds are at
    most rate * t + burst, whatever the number of threads sending, as long as each acquire
    asks for at most `burst` bytes (a larger one is held to the rate on average). Requests are
    served in the order they arrive (a reservation makes the bucket's level go negative; its
    sender waits until the level would be back at zero)."""

    def __init__(self, rate: int, burst: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(MIN_BURST, int(rate * BURST_SECONDS))
        self._clock = clock
        self._lock = threading.RLock()  # acquire reserves and reads its ticket in one hold
        self._level = float(self.burst)
        self._stamp = clock()
        self._lifted = threading.Event()
        self._reservations = 0  # made so far: tells whether a cancelled one was the last

    @property
    def lifted(self) -> bool:
        return self._lifted.is_set()

    def lift(self) -> None:
        """Suspend the cap now, for every sender held and every one to come."""
        self._lifted.set()

    def reimpose(self) -> None:
        """Cap again the bytes reserved from now on."""
        self._lifted.clear()

    def reserve(self, size: int) -> float:
        """Take `size` bytes from the bucket: the seconds until they may be sent (0: now)."""
        if size <= 0 or self.lifted:
            return 0.0
        with self._lock:
            now = self._clock()
            self._level = min(float(self.burst), self._level + (now - self._stamp) * self.rate)
            self._stamp = now
            self._level -= size
            self._reservations += 1
            return max(0.0, -self._level / self.rate)

    def acquire(self, size: int, cancelled: threading.Event | None = None) -> bool:
        """Block until `size` bytes may be sent, or the cap is lifted: True. False, at once,
        once `cancelled` is set (the file changed or went away); its bytes go back to the
        bucket if no reservation came after it (those behind it keep their turn: given back
        then, the bytes would let a newcomer through beside them, over the rate)."""
        with self._lock:
            delay = self.reserve(size)
            ticket = self._reservations
        if delay <= 0:
            return True
        if cancelled is None:
            self._lifted.wait(delay)
            return True
        ends = self._clock() + delay
        while not cancelled.is_set():
            left = ends - self._clock()
            if left <= 0 or self._lifted.wait(min(left, CANCEL_CHECK_SECONDS)):
                return True
        with self._lock:
            if self._reservations == ticket:
                self._level = min(float(self.burst), self._level + size)
        return False


def limiter_for(rate: int | None) -> BandwidthLimiter | None:
    """The limiter for a configured cap in bytes per second; None: no cap."""
    return None if rate is None else BandwidthLimiter(rate)
