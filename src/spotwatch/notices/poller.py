"""Polls each notice source on its own thread and hands each new notice to a callback once
(again when its deadline moves earlier: notices.store.SeenNotices), and what a source that
withdraws notices lists as in effect to another, whenever it changes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from spotwatch.aws.health import Reachability
from spotwatch.aws.imds import ImdsClient, ImdsError
from spotwatch.logs import get_logger
from spotwatch.model import Notice, NoticeListing
from spotwatch.notices.sources import SPOT_INSTANCE_ACTION, NoticeSource
from spotwatch.notices.store import SeenNotices

# The items other than the spot interruption warn minutes to hours ahead: polling them this
# often at most spares IMDS, which is throttled per instance.
OTHER_SOURCES_MIN_INTERVAL = 2.0

log = get_logger("spotwatch.notices")


class NoticePoller:
    """One thread per source, so a slow or hanging item never delays another: the spot
    interruption is detected within `interval` plus one request's `timeout`, whatever the
    other items do."""

    def __init__(
        self,
        client: ImdsClient,
        sources: Sequence[NoticeSource],
        interval: float,
        on_notice: Callable[[Notice], None],
        on_listing: Callable[[NoticeListing], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._sources = tuple(sources)
        self._interval = interval
        self._on_notice = on_notice
        self._on_listing = on_listing
        self._seen = SeenNotices()
        # Per source that withdraws notices, its last listing (each read on its own thread).
        self._listed: dict[str, NoticeListing] = {}
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(source,), daemon=True,
                             name=f"notice-poller-{source.name}")
            for source in self._sources
        ]
        self._failing: dict[str, str] = {}  # source name -> its last error
        self._reachability_lock = threading.Lock()
        # Read by the daemon for spotwatch_imds_up and health.
        self.reachability = Reachability("imds", clock, endpoint=client.endpoint)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        give_up_at = time.monotonic() + self._client.timeout * 3
        for thread in self._threads:
            thread.join(timeout=max(0.0, give_up_at - time.monotonic()))

    def interval_for(self, source: NoticeSource) -> float:
        if source == SPOT_INSTANCE_ACTION:
            return self._interval
        return max(self._interval, OTHER_SOURCES_MIN_INTERVAL)

    def poll_once(self) -> list[Notice]:
        """One pass over every source, one after another; returns the notices not seen before."""
        fresh = []
        for source in self._sources:
            fresh += self._poll(source)
        return fresh

    def _poll(self, source: NoticeSource) -> list[Notice]:
        began = self.reachability.outage.now()  # a hang fails only after its retries
        try:
            text = self._client.get(source.path)
        except ImdsError as exc:
            self._track_reachability(source, str(exc), began)
            return []
        self._track_reachability(source, None)
        if text is None:
            return []
        fresh = self._seen.first_sightings(source.parse(text))
        if source.listing is not None:
            self._note_listing(source.name, source.listing(text))
        return fresh

    def _note_listing(self, name: str, listing: NoticeListing | None) -> None:
        """Hands on a listing that changed (the first one too: a restarted daemon may hold a
        notice withdrawn meanwhile). A notice withdrawn is forgotten: listed again, it is a
        notice again."""
        previous = self._listed.get(name)
        if listing is None or listing == previous:
            return
        self._listed[name] = listing
        if previous is not None:
            self._seen.forget(previous.ids - listing.ids)
        if self._on_listing is not None:
            self._on_listing(listing)

    def _track_reachability(self, source: NoticeSource, error: str | None,
                            began: float | None = None) -> None:
        """IMDS counts as reachable while every polled item answers; the error names the
        items that do not; `began`: when the failed poll started."""
        with self._reachability_lock:
            if error is None:
                self._failing.pop(source.name, None)
            else:
                self._failing[source.name] = error
            self.reachability.report(not self._failing, "; ".join(
                f"{name}: {text}" for name, text in sorted(self._failing.items())), began)

    def _run(self, source: NoticeSource) -> None:
        """Invariant: a source is polled until the poller stops, whatever one answer does to
        its parser: a thread that ended would miss every later notice of that source."""
        interval = self.interval_for(source)
        while not self._stop.is_set():
            try:
                notices = self._poll(source)
            except Exception as exc:  # any failure of a parser: logged, and polling goes on
                log.error("notice_unreadable", source=source.name, error=repr(exc)[:200])
                notices = []
            for notice in notices:
                self._on_notice(notice)
            self._stop.wait(interval)
