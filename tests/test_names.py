"""No file name stops the protection of the others: names that are not UTF-8, control
characters, multi-byte characters and keys at S3's 1,024-byte limit, through the engine on the
moto server, the `flush` CLI and a restarted daemon."""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from spotwatch.aws.s3 import make_s3_client
from spotwatch.aws.store import S3ObjectStore, fits_xml
from spotwatch.config import TransferSettings, WatchDir
from spotwatch.keys import (
    MANIFEST_DIR,
    RESTORE_TEMP_SUFFIX,
    below_prefix,
    is_restore_temporary,
    object_key,
    restore_temporary_name,
    storable_key,
)
from spotwatch.sync.engine import SyncEngine
from spotwatch.sync.ledger import Ledger
from spotwatch.sync.tracker import ChangeTracker
from spotwatch.sync.uploader import Uploader

from .conftest import REGION, Workspace, keys_in, object_bytes, wait_for
from .test_daemon_e2e import flush_summary, save_checkpoint

PREFIX = "run/"
MANIFESTS = PREFIX + MANIFEST_DIR


def new_bucket(s3: Any) -> str:
    name = f"names-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": REGION})
    return name


@contextmanager
def engine_on(root: Path, bucket: str, state: Path, prefix: str = PREFIX) -> Iterator[SyncEngine]:
    """An engine watching root with no filters, uploading to bucket on the moto server."""
    transfer = TransferSettings()
    tracker = ChangeTracker(WatchDir(root, prefix, exclude=()), 0.1, 1.0)
    engine = SyncEngine([tracker], Ledger(state / "ledger.sqlite"),
                        lambda done: Uploader(S3ObjectStore(make_s3_client(REGION, transfer),
                                                            bucket, transfer), done))
    try:
        yield engine
    finally:
        engine.close()


def upload_everything(engine: SyncEngine) -> None:
    engine.reconcile(quiet_seconds=0)
    deadline = time.monotonic() + 60
    while not engine.idle():
        assert time.monotonic() < deadline, "uploads did not finish"
        engine.pump(upload=True)
        time.sleep(0.01)


def write_file(root: Path, relative: bytes, data: bytes) -> bool:
    """Create the file (bytes path); False when the tree makes it impossible (a file where a
    directory is needed, or the name already taken)."""
    path = os.path.join(os.fsencode(root), relative)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "xb") as handle:
            handle.write(data)
    except OSError:
        return False
    return True


def storable(relative: bytes) -> bool:
    """S3's rules, stated independently of spotwatch's code: UTF-8, and both the file's key and
    its set's manifest key at most 1,024 bytes."""
    try:
        relative.decode("utf-8")
    except UnicodeDecodeError:
        return False
    set_name = relative.split(b"/", 1)[0]
    manifest = MANIFESTS.encode() + set_name + b".json"
    return len(PREFIX.encode() + relative) <= 1024 and len(manifest) <= 1024


def uploaded_files(s3: Any, bucket: str) -> set[str]:
    return {k for k in keys_in(s3, bucket) if not k.startswith(MANIFESTS)}


_component = st.one_of(
    st.binary(min_size=1, max_size=255),  # mostly not UTF-8
    st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=120).map(
        lambda text: text.encode()),  # UTF-8 with control and multi-byte characters
    st.integers(200, 255).map(lambda n: b"l" * n),  # long: deep paths cross 1,024 bytes
).filter(lambda name: len(name) <= 255 and b"/" not in name and b"\0" not in name
         and name not in (b".", b"..")
         # S3 takes a newline in a key, but moto's URL router does not (404).
         and b"\n" not in name)


@settings(max_examples=500)
@given(st.lists(_component, min_size=1, max_size=6))
def test_storable_key_follows_s3s_rules(parts: list[bytes]) -> None:
    relative = b"/".join(parts)
    try:
        key = storable_key(PREFIX, os.fsdecode(relative))
    except ValueError:
        assert not storable(relative)
    else:
        assert storable(relative) and key.encode() == PREFIX.encode() + relative


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.lists(_component, min_size=1, max_size=5), min_size=1, max_size=6))
def test_any_names_every_storable_file_is_uploaded(s3: Any, names: list[list[bytes]]) -> None:
    bucket = new_bucket(s3)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "ckpt"
        root.mkdir()
        written = {b"/".join(parts) for parts in names
                   if write_file(root, b"/".join(parts), b"x")}
        good = b"good/model.pt"
        assert write_file(root, good, b"weights") or good in written
        written.add(good)
        expected = {PREFIX + rel.decode() for rel in written if storable(rel)}
        with capture_logs() as logs, engine_on(root, bucket, Path(scratch)) as engine:
            upload_everything(engine)
            engine.reconcile(quiet_seconds=0)  # a second scan warns about nobody again
        assert uploaded_files(s3, bucket) == expected
        assert object_bytes(s3, bucket, PREFIX + good.decode()) == b"weights"
        refused = [e["path"] for e in logs if e["event"] == "path_refused"]
        assert sorted(refused) == sorted(
            os.path.join(root, os.fsdecode(rel)).encode("utf-8", "surrogateescape").decode(
                "utf-8", "backslashreplace") for rel in written if not storable(rel))
        # A manifest means complete: a set holding any name S3 cannot take stays unsealed.
        complete = {rel.split(b"/", 1)[0] for rel in written} - {
            rel.split(b"/", 1)[0] for rel in written if not storable(rel)}
        manifests = {k for k in keys_in(s3, bucket) if k.startswith(MANIFESTS)}
        assert manifests == {MANIFESTS + name.decode() + ".json" for name in complete}


def test_keys_up_to_1024_bytes_are_uploaded_longer_ones_refused_once(
        tmp_path: Path, s3: Any, bucket: str) -> None:
    root = tmp_path / "ckpt"
    directory = "s/" + "/".join(c * 120 for c in "éüßø")  # 2 bytes a character
    fits = directory + "/" + "x" * (1024 - len(f"{PREFIX}{directory}/".encode()))
    too_long = fits + "y"
    assert len((PREFIX + fits).encode()) == 1024 and len(PREFIX + fits) < 1000
    for relative in (fits, too_long, "s/ok.pt"):
        assert write_file(root, relative.encode(), relative.encode())
    with capture_logs() as logs, engine_on(root, bucket, tmp_path) as engine:
        upload_everything(engine)
        too_long_path = root / too_long
        os.utime(too_long_path)  # settles again: no second warning, no upload attempt
        engine.trackers[0].mark(too_long_path, closed=True, at=float("-inf"))
        engine.collect_settled()
        upload_everything(engine)
    assert uploaded_files(s3, bucket) == {PREFIX + fits, PREFIX + "s/ok.pt"}
    refused = [e for e in logs if e["event"] == "path_refused"]
    assert [e["path"] for e in refused] == [str(root / too_long)]
    assert "1025 bytes" in refused[0]["reason"]
    assert not [e for e in logs if e["event"] == "upload_failed"]
    # The set holds a file S3 cannot take: it is reported incomplete, never sealed.
    assert MANIFESTS + "s.json" not in keys_in(s3, bucket)
    incomplete = [e for e in logs if e["event"] == "set_incomplete"]
    assert incomplete and incomplete[-1]["missing"] == [too_long]


def test_a_file_whose_set_manifest_key_would_be_too_long_is_refused(
        tmp_path: Path, s3: Any, bucket: str) -> None:
    root = tmp_path / "ckpt"
    prefix = "p" * 759 + "/"
    manifests = prefix + MANIFEST_DIR
    fits, too_long = "f" * (1024 - len(manifests) - len(".json")), "t" * 239
    assert len(manifests + fits + ".json") == 1024 and len(prefix + too_long) < 1024
    for name in (fits, too_long):
        assert write_file(root, name.encode(), b"top-level file: a set of its own")
    with capture_logs() as logs, engine_on(root, bucket, tmp_path, prefix) as engine:
        upload_everything(engine)
    assert keys_in(s3, bucket) == {prefix + fits, manifests + fits + ".json"}
    [refused] = [e for e in logs if e["event"] == "path_refused"]
    assert refused["path"] == str(root / too_long)
    assert "set manifest key would be 1025 bytes" in refused["reason"]


BAD = b"step_1/bad\xffname.pt"
BAD_DIRECTORY = b"step_\xfe/model.pt"


def plant_bad_names(checkpoints: Path) -> None:
    for relative in (BAD, BAD_DIRECTORY):
        assert write_file(checkpoints, relative, b"odd")


def test_flush_skips_names_that_are_not_utf8_and_uploads_the_rest(
        workspace: Workspace, s3: Any) -> None:
    plant_bad_names(workspace.checkpoints)
    good = {"run1/step_1/model.pt": b"weights", "run1/step_2/tab\tand\x01ctl é.pt": b"ctl"}
    for key, data in good.items():
        assert write_file(workspace.checkpoints, key.removeprefix("run1/").encode(), data)
    result = workspace.cli("flush", "-c", str(workspace.config_file))
    # Not everything is protected: exit 1, and one line names the files left out.
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"spotwatch: error: 2 files whose names S3 cannot take, their sets left without a "
        f"manifest: {workspace.checkpoints}/step_1/bad\\xffname.pt, "
        f"{workspace.checkpoints}/step_\\xfe/model.pt; 1 sets left without a manifest, a "
        f"file they need not in S3: run1/step_1")
    for key, data in good.items():
        assert object_bytes(s3, workspace.bucket, key) == data
    assert result.stderr.count('"path_refused"') == 2
    assert "bad\\\\xffname.pt" in result.stderr  # escaped, as JSON shows a backslash
    assert "step_\\\\xfe/model.pt" in result.stderr
    manifests = {k for k in keys_in(s3, workspace.bucket) if k.startswith("run1/.spotwatch/")}
    # step_1 holds a name S3 cannot take: the set stays unsealed and is reported incomplete.
    assert manifests == {"run1/.spotwatch/manifests/step_2.json"}
    assert '"set_incomplete"' in result.stderr and "run1/step_1" in result.stderr


def test_daemon_skips_bad_names_seen_live_and_survives_a_restart(
        workspace: Workspace, s3: Any) -> None:
    plant_bad_names(workspace.checkpoints)
    first = workspace.start_daemon()
    first.wait_for_event("path_refused", count=2)
    assert write_file(workspace.checkpoints, b"step_3/live\xfdname.pt", b"odd")  # an event
    assert write_file(workspace.checkpoints, b"step_3/model.pt", b"three")
    wait_for(lambda: "run1/step_3/model.pt" in keys_in(s3, workspace.bucket), timeout=30)
    first.wait_for_event("path_refused", count=3)
    asked = workspace.cli("flush", "-c", "config.yaml")  # the daemon flushes: says so too
    assert asked.returncode == 1, asked.stderr
    assert asked.stderr.splitlines()[-1].startswith(
        "spotwatch: error: 3 files whose names S3 cannot take, their sets left without a "
        "manifest: ")
    assert first.stop() == 1  # files left unprotected: the final flush says so
    [incomplete] = first.named("flush_incomplete")
    assert len(incomplete["refused_files"]) == 3

    second = workspace.start_daemon()  # the startup scan meets all three again
    second.wait_for_event("startup_scan_done")
    assert write_file(workspace.checkpoints, b"step_4/model.pt", b"four")
    wait_for(lambda: "run1/step_4/model.pt" in keys_in(s3, workspace.bucket), timeout=30)
    # A file changed within quiet_seconds before the start settles first, then is refused.
    second.wait_for_event("path_refused", count=3)
    assert len(second.named("path_refused")) == 3
    assert second.process.poll() is None
    assert second.stop() == 1
    assert object_bytes(s3, workspace.bucket, "run1/step_3/model.pt") == b"three"
    assert len(first.named("path_refused")) == 3  # once per file, not once per event


# Names that take all of NAME_MAX (255 bytes) in 1-, 2- and 3-byte characters.
FULL_NAMES = ("l" * 255, "é" * 127 + "x", "文" * 85)


@pytest.mark.usefixtures("transfer_client")
def test_names_that_fill_name_max_are_restored(workspace: Workspace) -> None:
    """A restore's temporary sits beside its file under a longer name: it must still fit."""
    assert all(len(name.encode()) == 255 for name in FULL_NAMES)
    written = {}
    for index, name in enumerate(FULL_NAMES):
        written[name] = os.urandom(1_000 + index)
        assert write_file(workspace.checkpoints, f"step_1/{name}".encode(), written[name])
    flushed = workspace.cli("flush", "-c", "config.yaml")
    assert flushed.returncode == 0, flushed.stderr
    target = workspace.root / "restored"
    restored = workspace.cli("restore", "-c", "config.yaml", "--to", str(target))
    assert restored.returncode == 0, restored.stderr
    assert sorted(os.listdir(target / "step_1")) == sorted(FULL_NAMES)
    for name, data in written.items():
        assert (target / "step_1" / name).read_bytes() == data


def test_files_in_spotwatchs_own_key_space_are_named_once_not_uploaded(
        workspace: Workspace, s3: Any) -> None:
    """`.spotwatch/` below a watched directory is spotwatch's own key space: a user's files
    there are never uploaded (they would overwrite manifests), and the log says so once."""
    for relative in (b".spotwatch/notes.txt", b".spotwatch/manifests/step_9.json",
                     b"step_1/model.pt"):
        assert write_file(workspace.checkpoints, relative, b"data")
    daemon = workspace.start_daemon()
    assert write_file(workspace.checkpoints, b".spotwatch/live.pt", b"data")  # an event
    assert write_file(workspace.checkpoints, b"step_2/model.pt", b"two")
    wait_for(lambda: "run1/.spotwatch/manifests/step_2.json" in keys_in(s3, workspace.bucket))
    assert daemon.stop() == 0
    [skipped] = daemon.named("reserved_name_skipped")
    assert skipped["path"] == str(workspace.checkpoints / ".spotwatch")
    assert keys_in(s3, workspace.bucket) == {
        "run1/step_1/model.pt", "run1/step_2/model.pt",
        "run1/.spotwatch/manifests/step_1.json", "run1/.spotwatch/manifests/step_2.json"}


def test_restore_prefix_names_a_watch_entry_with_or_without_its_slash(
        workspace: Workspace, tmp_path: Path) -> None:
    """Keys show `run1/...` whether the config says `run1` or `run1/`: --prefix takes both."""
    other = tmp_path / "other"
    workspace.write_config(watch=[{"path": str(workspace.checkpoints), "prefix": "run1/"},
                                  {"path": str(other), "prefix": "run2"}])
    assert write_file(workspace.checkpoints, b"step_1/model.pt", b"one")
    assert write_file(other, b"step_2/model.pt", b"two")
    assert workspace.cli("flush", "-c", "config.yaml").returncode == 0
    for spelled, restored in (("run1/", "step_1"), ("run1", "step_1"),
                              ("run2", "step_2"), ("run2/", "step_2")):
        target = tmp_path / f"to-{spelled.replace('/', '_')}"
        result = workspace.cli("restore", "-c", "config.yaml", "--prefix", spelled,
                               "--to", str(target))
        assert result.returncode == 0, result.stderr
        assert (target / restored / "model.pt").exists()
    for wrong in ("run", "run1//", "/run1/", "run3/"):
        result = workspace.cli("restore", "-c", "config.yaml", "--prefix", wrong)
        assert result.returncode == 2
        assert result.stderr.strip() == (
            f"spotwatch: error: no watched directory has prefix {wrong!r}")


@pytest.mark.parametrize(("sealed_with", "now"), [("run1", "run1/"), ("run1/", "run1")])
def test_sets_sealed_before_a_prefix_gained_or_lost_its_slash_still_count(
        workspace: Workspace, tmp_path: Path, sealed_with: str, now: str) -> None:
    """`run1` and `run1/` write the same keys: a config edited from one to the other (copied
    from the README's `prefix: llama-70b/`, say) must still restore, and keep, every set
    sealed before. Their manifests say the prefix as it was spelled then."""
    def configure(prefix: str) -> None:
        workspace.write_config(watch=[{"path": str(workspace.checkpoints), "prefix": prefix}])

    configure(sealed_with)
    for number in (1, 2):
        assert write_file(workspace.checkpoints, f"step_{number}/model.pt".encode(), b"x")
        assert workspace.cli("flush", "-c", "config.yaml").returncode == 0
    configure(now)
    result = workspace.cli("restore", "-c", "config.yaml", "--to", str(tmp_path / "restored"))
    assert result.returncode == 0, result.stderr
    assert "manifest_skipped" not in result.stderr
    assert (tmp_path / "restored" / "step_2" / "model.pt").read_bytes() == b"x"
    # Retention sees both sets too: keeping one drops the other, its manifest and its file.
    pruned = workspace.cli("prune", "-c", "config.yaml", "--keep-sets", "1", "--dry-run")
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout.splitlines()[-1] == "would delete 2 objects"


@given(st.text(max_size=30))
def test_a_key_goes_in_a_delete_batch_only_if_its_xml_names_it_exactly(key: str) -> None:
    """DeleteObjects names its keys in an XML body: a key fits it when that body, as an XML
    parser reads it, gives the key back (no control character, no carriage return, which
    parsers turn into a line feed); any other goes alone in a DeleteObject."""
    element = ElementTree.Element("Key")
    element.text = key
    try:
        read_back = ElementTree.fromstring(ElementTree.tostring(element, encoding="utf-8")).text
    except (ElementTree.ParseError, UnicodeEncodeError):
        read_back = None
    assert fits_xml(key) == ((read_back or "") == key)


def test_keys_with_characters_xml_cannot_carry_are_deleted_too(s3: Any) -> None:
    """A control character in a file's name is a key S3 stores, but a DeleteObjects body naming
    it is refused whole (MalformedXML): a mirrored deletion of that one file failed every
    prune, with the other keys of its batch."""
    bucket = new_bucket(s3)
    keys = [f"run1/step_2/log{odd}.txt" for odd in ("\x01", "\x1f", "\r", "\x7f", "\t")]
    keys += ["run1/step_1/model.pt", "run1/step_2/model.pt"]
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    assert set(keys_in(s3, bucket)) == set(keys)
    store = S3ObjectStore(make_s3_client(REGION, TransferSettings()), bucket, TransferSettings())
    try:
        assert store.delete_many(keys) == {}
    finally:
        store.close()
    assert not keys_in(s3, bucket)


_segment = st.text(st.characters(blacklist_characters="/", blacklist_categories=("Cs",)),
                   min_size=1, max_size=8)


@given(st.lists(st.lists(_segment, max_size=3).map(lambda parts: "".join(
           f"{part}/" for part in parts)), min_size=1, max_size=4, unique=True),
       st.data())
def test_a_key_maps_back_to_the_first_watched_prefix_holding_it(
        prefixes: list[str], data: st.DataObject) -> None:
    """Deletions and reseals map an object's key back to its watched directory this way: the
    path found is the one the key was made of, below the first prefix that holds it."""
    watch = data.draw(st.integers(0, len(prefixes) - 1))
    relative = "/".join(data.draw(st.lists(_segment, min_size=1, max_size=3)))
    key = object_key(prefixes[watch], relative)
    found = below_prefix(key, ((prefix, index) for index, prefix in enumerate(prefixes)))
    assert found is not None
    first = next(index for index, prefix in enumerate(prefixes) if key.startswith(prefix))
    assert found == (first, key[len(prefixes[first]):])
    if first == watch:
        assert found[1] == relative
    assert below_prefix(key, []) is None


@pytest.mark.parametrize("name", [f".notes{RESTORE_TEMP_SUFFIX}", f".model.pt{RESTORE_TEMP_SUFFIX}",
                                  f".model.pt.kept{RESTORE_TEMP_SUFFIX}"])
def test_a_file_named_like_a_restores_temporary_is_the_trainers(
        workspace: Workspace, s3: Any, name: str) -> None:
    """A restore's temporaries carry its token: a file of the trainer's that only looks like
    one is uploaded with its set, and a restore into the watched directory leaves it be."""
    save_checkpoint(workspace.checkpoints / "step_1" / "model.pt", 1_000)
    (workspace.checkpoints / "step_1" / name).write_bytes(b"the trainer's own")
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    assert f"run1/step_1/{name}" in keys_in(s3, workspace.bucket)
    for target in (workspace.checkpoints, workspace.root / "elsewhere"):
        result = workspace.cli("restore", "-c", "config.yaml", "--to", str(target))
        assert result.returncode == 0, result.stderr
        assert (target / "step_1" / name).read_bytes() == b"the trainer's own"


@given(st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
               min_size=1, max_size=40),
       st.sampled_from(["", ".0123456789ab", ".notes"]))
def test_only_the_names_a_restore_makes_are_its_temporaries(stem: str, tail: str) -> None:
    """Any name a restore gives a temporary is one; of the names a trainer may give a file
    (a hidden name ending as a temporary's, a tag of twelve hex digits or not), only a name a
    restore would make for the file named before its last dot."""
    assert is_restore_temporary(f"dir/{restore_temporary_name(stem)}")
    name = f".{stem}{tail}{RESTORE_TEMP_SUFFIX}"
    before, dot, _ = (stem + tail).rpartition(".")
    assert is_restore_temporary(name) == (
        bool(dot and before) and restore_temporary_name(before) == name)


def test_a_backslash_in_a_name_goes_up_where_the_store_keeps_it(workspace: Workspace,
                                                                  s3: Any) -> None:
    """S3 (here moto) keeps a key holding a backslash as sent: the store is asked once, by a
    probe under .spotwatch/ that it leaves no trace of, and such files upload and restore."""
    files = {"step_1/rank\\0.pt": b"rank 0", "step_1/a\\b\\c.pt": b"c", "step_1\\x.pt": b"x"}
    for name, data in files.items():
        save = workspace.checkpoints / name
        save.parent.mkdir(parents=True, exist_ok=True)
        save.write_bytes(data)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    assert {f"run1/{name}" for name in files} <= keys_in(s3, workspace.bucket)
    assert not [key for key in keys_in(s3, workspace.bucket) if "probe" in key]
    target = workspace.root / "restored"
    result = workspace.cli("restore", "-c", "config.yaml", "--to", str(target))
    assert result.returncode == 0, result.stderr
    restored = workspace.cli("restore", "-c", "config.yaml", "--to", str(target),
                             "--set", "step_1\\x.pt")
    assert restored.returncode == 0, restored.stderr
    for name, data in files.items():
        assert (target / name).read_bytes() == data, name
