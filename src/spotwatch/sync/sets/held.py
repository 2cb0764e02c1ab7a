"""Held copies: the sealed version of a file kept restorable while a new version replaces it.

A file of a sealed set may be written again (a flat model.pt or last.ckpt saved every epoch, a
`latest` pointer, an evaluation's results written into a step). Its new version goes to the
key the sealed manifest lists, and the set's new manifest is written only once all of it is
in S3. In between, the object at the key is no longer the one the manifest lists.

Invariant: the last sealed version of a set stays restorable until its successor is sealed.
Before a new version of a file replaces the object its set's sealed manifest lists, that
object is copied server-side to its held key (keys.held_key), on condition that it is still
the sealed version (CopySourceIfMatch, the manifest entry's ETag): S3's 412 means it is not,
and a held copy made before holds the sealed version. Restore reads a held copy in place of
an object that no longer matches its entry (sync.sets.remote.stand_in). A copy that fails
otherwise fails the upload, which is retried as any failed upload: the sealed object is never
replaced unprotected.

Invariant: held copies are made against the manifest in S3 now. A seal under way is waited
for (until its write has ended, and the set's held copies went after it), so no copy is made
against the manifest it replaces, and no copy made for the new manifest is deleted as a
leftover of the old one. Once the manifest is written, the set's held copies are deleted; a
crash before leaves them, deleted at the set's next seal (or with the set by retention).

A held copy of an object too large for one CopyObject is a multipart upload. Its key is
noted (MultipartNotes) while it runs, so that one a crash cut short is aborted at the next
start (sync.orphans) instead of keeping its parts stored and billed.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Protocol

from spotwatch.aws.store import ObjectStore, StoreError
from spotwatch.keys import (
    S3_KEY_MAX_BYTES,
    held_key,
    held_key_of,
    held_of_set,
    held_prefix,
    object_key,
)
from spotwatch.logs import get_logger
from spotwatch.sync.sets.manifest import Manifest
from spotwatch.sync.sets.parts import JobNode
from spotwatch.sync.sets.remote import bare_etag, versions_in_other_parts
from spotwatch.sync.sets.sealed import SealedSets

log = get_logger("spotwatch.sets")


# Held copies made at once (each one a server-side copy: no bytes pass through this host).
COPIES_AT_ONCE = 4


class MultipartNotes(Protocol):
    """Where multipart uploads under way are noted for the cleanup after a crash."""

    def started(self, key: str) -> None: ...

    def finished(self, key: str) -> None: ...


class HeldCopies:
    """Thread-safe: copies are planned on the uploader's precheck thread and made on a pool
    of their own, seals end on the store's threads."""

    def __init__(self, store: ObjectStore, sealed_sets: SealedSets, *,
                 node: JobNode | None, multipart: MultipartNotes | None = None,
                 waits_for_marker: Callable[[str, str], bool] = lambda prefix, name: False
                 ) -> None:
        """node: on a node of a multi-node job, only held copies of the files its own part
        lists are this node's to delete (other nodes protect theirs), and only once no other
        node's part needs them. multipart: where the copies made in parts are noted while
        they run. waits_for_marker(prefix, set name): whether the set may wait for a marker
        before it is sealed again (sealer.may_wait_for_marker): its copies are made under a
        deadline too (see hurry)."""
        self._waits_for_marker = waits_for_marker
        self._store = store
        self._multipart = multipart
        self._sealed_sets = sealed_sets
        self._node = node
        self._lock = threading.Lock()
        self._sealing: dict[tuple[str, str], Future[None]] = {}  # (prefix, set) -> its seal
        # Held keys made here, or found under a prefix (listed once), by (prefix, set).
        self._held: dict[tuple[str, str], set[str]] = defaultdict(set)
        self._listed: set[str] = set()
        self._after = ThreadPoolExecutor(max_workers=1, thread_name_prefix="held")
        # Copies run here, not on the uploader's one precheck thread: a copy of a large file
        # (a minute for tens of GB) holds up only the upload of its own file.
        self._copier = ThreadPoolExecutor(max_workers=COPIES_AT_ONCE,
                                          thread_name_prefix="held-copy")
        self._hurried = False

    def hurry(self, until: float | None) -> None:
        """A flush's deadline runs until then (None: none runs any more). While one runs, no
        copy is started: the new version goes first. Its upload replaces the object only
        when it completes (a multipart upload at its last request), and the set's manifest
        is written right after it, so the sealed version is unprotected for that moment
        only, where a copy of a large file could cost the new version its deadline. Not so
        for a set that waits for its trainer's marker to be sealed again (a set saved again in
        place: sealer.stale_markers): its sealed version may stay the checkpoint for good, so
        its copies are made all the same."""
        self._hurried = until is not None

    def close(self) -> None:
        """Copies not begun never begin; one under way is abandoned (a stop is bounded)."""
        self._copier.shutdown(wait=False, cancel_futures=True)

    def protect(self, prefix: str, set_name: str, key: str) -> Future[None] | None:
        """Before a new version of the file at key is uploaded: the sealed version at key,
        if a sealed manifest lists one, is copied to its held key. The copy under way, whose
        failure means the upload must not start; None when there is none to make. Called on
        the uploader's one precheck thread, so nothing here waits: a seal of the set under
        way is waited for on the copies' pool."""
        with self._lock:
            sealing = self._sealing.get((prefix, set_name))
        if sealing is not None:
            return self._copier.submit(self._copy_after_seal, prefix, set_name, key)
        planned = self._plan(prefix, set_name, key)
        return None if planned is None else self._copier.submit(self._copy, *planned)

    def _copy_after_seal(self, prefix: str, set_name: str, key: str) -> None:
        while True:
            with self._lock:
                sealing = self._sealing.get((prefix, set_name))
            if sealing is None:
                break
            wait([sealing])
        planned = self._plan(prefix, set_name, key)
        if planned is not None:
            self._copy(*planned)

    def _plan(self, prefix: str, set_name: str,
              key: str) -> tuple[str, str, str, int, bool] | None:
        """(key, held key, ETag, size) of the copy to make against the manifest in S3 now;
        None when there is none to make."""
        entry = self._sealed_sets.sealed_entry(prefix, set_name, key)
        if entry is None:
            return None  # a new file, or a set never sealed: nothing to keep
        kept_under_deadline = self._waits_for_marker(prefix, set_name)
        if self._skipped_under_deadline(key, kept_under_deadline):
            return None
        etag = bare_etag(entry.etag)
        if etag is None:
            # A manifest written before ETags were recorded: no copy can be made on
            # condition, and one made without could replace a held copy of the sealed
            # version with a later one. The set's next seal records them.
            log.warning("held_copy_skipped", key=key, reason="its manifest records no ETag")
            return None
        held = held_key_of(prefix, key)
        if len(held.encode()) > S3_KEY_MAX_BYTES:
            # A key within 16 bytes of S3's limit is uploaded all the same (keys.storable_key),
            # as before there were held copies.
            log.warning("held_copy_skipped", key=key,
                        reason=f"its held copy's key would exceed {S3_KEY_MAX_BYTES} bytes")
            return None
        with self._lock:  # before the copy: one whose reply is lost is deleted all the same
            self._held[(prefix, set_name)].add(held)
        return key, held, etag, entry.size, kept_under_deadline

    def _skipped_under_deadline(self, key: str, kept_under_deadline: bool) -> bool:
        skipped = self._hurried and not kept_under_deadline
        if skipped:
            log.info("held_copy_skipped", key=key,
                     reason="a flush's deadline runs: the new version goes first")
        return skipped

    def _copy(self, key: str, held: str, etag: str, size: int,
              kept_under_deadline: bool) -> None:
        if self._skipped_under_deadline(key, kept_under_deadline):  # queued before it began
            return
        notes = self._multipart if self._store.copies_in_parts(size) else None
        if notes is not None:
            notes.started(held)
        # A copy that raises keeps its note: its parts may be left (a stop cancelled it, the
        # abort failed), and the next start aborts them.
        copied = self._store.copy_if_match(key, held, f'"{etag}"', size)
        if notes is not None:
            notes.finished(held)
        if copied:
            log.info("held_copy_made", key=key, held=held, bytes=size)

    def sealing(self, prefix: str, set_name: str, manifest: Manifest,
                written: Future[None]) -> Future[None]:
        """The set's manifest write is under way (written): returns the future the caller
        waits on instead, which ends as written does, once the set's held copies are
        deleted after a write that got through. Held copies of the set wait for it."""
        done: Future[None] = Future()
        with self._lock:
            self._sealing[(prefix, set_name)] = done

        def after(_: Any) -> None:
            # Off the thread that wrote the manifest, and never on the daemon's loop (a write
            # done already runs this at once): the cleanup makes requests of its own.
            try:
                self._after.submit(finished)
            except RuntimeError:  # shut down: settled here, so that no copy waits for good
                finished()

        def finished() -> None:
            error: BaseException | None = None
            try:
                error = written.exception()
                if error is None:
                    self._sealed_sets.sealed_here(prefix, set_name, manifest)
                    self._release(prefix, set_name, manifest)
            except BaseException as exc:  # cancelled, or the cleanup's own failure
                error = exc
            finally:
                if error is not None:  # the write may have landed all the same
                    self._sealed_sets.forget(prefix, set_name)
                with self._lock:
                    if self._sealing.get((prefix, set_name)) is done:
                        del self._sealing[(prefix, set_name)]
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

        written.add_done_callback(after)
        return done

    def _release(self, prefix: str, set_name: str, manifest: Manifest) -> None:
        """Delete the set's held copies: its manifest in S3 now lists what is in S3. A
        failure leaves them, deleted at the set's next seal."""
        try:
            self._list_once(prefix)
            with self._lock:
                keys = sorted(self._held.get((prefix, set_name), ()))
            if self._node is not None:  # only those of the files this node's part lists
                own = {held_key(prefix, entry.path) for entry in manifest.files}
                keys = [key for key in keys if key in own]
            keys = self._unneeded(prefix, set_name, manifest, keys)
            if not keys:
                return
            refused = set(self._store.delete_many(keys))
        except StoreError as exc:
            log.warning("held_copies_left", set=set_name, error=str(exc),
                        detail="deleted at the set's next seal")
            return
        with self._lock:
            self._held[(prefix, set_name)].difference_update(set(keys) - refused)
        log.info("held_copies_deleted", set=set_name, keys=len(keys) - len(refused))

    def _unneeded(self, prefix: str, set_name: str, manifest: Manifest,
                  keys: list[str]) -> list[str]:
        """The held keys no sealed manifest or part needs any more.

        Invariant: a held copy goes only once every version of its file that the set's new
        manifest and (on a job) the other nodes' parts list is the object at the file's key
        now. On a job another node's part may still list the version it holds (a file the
        nodes write alike, rewritten by one of them), and this node's own part may list a
        version another node has replaced since; restore reads the held copy for either."""
        if not keys:
            return []
        listed: dict[str, set[str | None]] = {
            entry.key: {bare_etag(entry.etag)} for entry in manifest.files}
        if self._node is not None:
            others = versions_in_other_parts(self._store, prefix, self._node.job_id, set_name,
                                             self._node.rank)
            for key, etags in others.items():
                listed.setdefault(key, set()).update(etags)
        now = {found.key: bare_etag(found.etag)
               for found in self._store.list_objects(object_key(prefix, set_name))}
        unneeded = []
        for held in keys:
            key = object_key(prefix, held.removeprefix(held_prefix(prefix)))
            wanted = listed.get(key, set())
            if not wanted or (key in now and wanted == {now[key]}):
                unneeded.append(held)
            else:
                log.info("held_copy_kept", key=key, held=held,
                         reason="a sealed manifest or part lists another version than the "
                                "object at the key")
        return unneeded

    def _list_once(self, prefix: str) -> None:
        """Held copies a run before left (a crash before their set was sealed again), found
        by one listing per prefix: deleted at their set's next seal."""
        with self._lock:
            if prefix in self._listed:
                return
        found = [listed.key for listed in self._store.list_objects(held_prefix(prefix))]
        with self._lock:
            self._listed.add(prefix)
            for key in found:
                set_name = key[len(held_prefix(prefix)):].split("/", 1)[0]
                if held_of_set(prefix, set_name, key):
                    self._held[(prefix, set_name)].add(key)
