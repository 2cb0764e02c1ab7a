"""Interruption notice sources: each turns one metadata item into frozen Notice values."""

from spotwatch.notices.sources import DEFAULT_SOURCES, NoticeSource, sources_for

__all__ = ["DEFAULT_SOURCES", "NoticeSource", "sources_for"]
