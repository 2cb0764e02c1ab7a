"""Run the IMDS emulator on its own: python -m spotwatch.emulator --port 8111."""

from __future__ import annotations

import argparse
import signal

from spotwatch.emulator.imds import ImdsEmulator


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m spotwatch.emulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--region", default="us-west-2")
    args = parser.parse_args()
    # Blocked before the server threads start (they inherit the mask), then waited for here:
    # no handler runs in the middle of other code.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    emulator = ImdsEmulator(args.host, args.port, args.region).start()
    print(emulator.url, flush=True)
    signal.sigwait(stop_signals)
    emulator.stop()


if __name__ == "__main__":
    main()
