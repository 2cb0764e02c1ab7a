"""spotwatch: keeps EC2 Spot training checkpoints safe in S3 when the instance is reclaimed."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("spotwatch")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

from spotwatch.interruption import interruption_pending

__all__ = ["__version__", "interruption_pending"]
