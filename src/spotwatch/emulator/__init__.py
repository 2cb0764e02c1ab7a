"""Local stand-ins for AWS services, used by the tests and by `spotwatch demo`."""

from spotwatch.emulator.imds import Fault, ImdsEmulator

__all__ = ["Fault", "ImdsEmulator"]
