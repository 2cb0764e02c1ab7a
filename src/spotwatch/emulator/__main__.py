"""Run the IMDS emulator on its own: python -m spotwatch.emulator --port 8111."""

from __future__ import annotations

import argparse
import signal
import threading

from spotwatch.emulator.imds import ImdsEmulator


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m spotwatch.emulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--region", default="us-west-2")
    args = parser.parse_args()
    emulator = ImdsEmulator(args.host, args.port, args.region).start()
    print(emulator.url, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    emulator.stop()


if __name__ == "__main__":
    main()
