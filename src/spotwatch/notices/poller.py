"""Polls the notice sources on one thread and hands each new notice to a callback once."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import structlog

from spotwatch.imds import ImdsClient, ImdsError
from spotwatch.notices.model import Notice
from spotwatch.notices.sources import NoticeSource

log = structlog.get_logger("spotwatch.notices")


class NoticePoller:
    def __init__(
        self,
        client: ImdsClient,
        sources: Sequence[NoticeSource],
        interval: float,
        on_notice: Callable[[Notice], None],
    ) -> None:
        self._client = client
        self._sources = tuple(sources)
        self._interval = interval
        self._on_notice = on_notice
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notice-poller", daemon=True)
        self._reachable: bool | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._client.timeout * 3)

    def poll_once(self) -> list[Notice]:
        """One pass over every source; returns the notices not seen before."""
        fresh = []
        for source in self._sources:
            try:
                text = self._client.get(source.path)
            except ImdsError as exc:
                self._set_reachable(False, str(exc))
                continue
            self._set_reachable(True, "")
            for notice in source.parse(text) if text is not None else []:
                if notice.id not in self._seen:
                    self._seen.add(notice.id)
                    fresh.append(notice)
        return fresh

    def _set_reachable(self, reachable: bool, error: str) -> None:
        # Log transitions only: a daemon off EC2 must not log an error every second.
        if reachable == self._reachable:
            return
        self._reachable = reachable
        if reachable:
            log.info("imds_reachable", endpoint=self._client.endpoint)
        else:
            log.warning("imds_unreachable", endpoint=self._client.endpoint, error=error)

    def _run(self) -> None:
        while not self._stop.is_set():
            for notice in self.poll_once():
                self._on_notice(notice)
            self._stop.wait(self._interval)
