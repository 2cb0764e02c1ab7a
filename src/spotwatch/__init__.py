"""spotwatch: keeps EC2 Spot training checkpoints safe in S3 when the instance is reclaimed."""

from spotwatch.interruption import interruption_pending

__all__ = ["__version__", "interruption_pending"]


def __getattr__(name: str) -> str:
    # Looked up on demand: importing importlib.metadata costs every command tens of ms.
    if name != "__version__":
        raise AttributeError(f"module 'spotwatch' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spotwatch")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0"
