"""Restore hands back only verified bytes, only from the configured prefix, only of a set that
was sealed complete: end to end with the CLI against the moto server."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

from spotwatch.aws.s3 import make_s3_client
from spotwatch.commands.status import render_status
from spotwatch.config import load_config
from spotwatch.daemon.loop import Daemon
from spotwatch.keys import RESTORE_TEMP_SUFFIX, is_restore_temporary, manifest_key
from spotwatch.sync.restore.destination import temporary
from spotwatch.sync.sets.manifest import Manifest, ManifestEntry

from .conftest import Workspace, keys_in, object_bytes, wait_for
from .faultproxy import FaultProxy, Request
from .test_checkpoint_sets import MANIFESTS, make_sets, restore
from .test_daemon_e2e import flush_summary, save_checkpoint

MiB = 1 << 20


def log_events(stderr: str) -> list[dict[str, Any]]:
    events = []
    for line in stderr.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def named(stderr: str, event: str) -> list[dict[str, Any]]:
    return [e for e in log_events(stderr) if e.get("event") == event]


def restored_files(target: Path) -> set[str]:
    return {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}


@pytest.mark.usefixtures("transfer_client")
def test_replaced_object_makes_the_set_corrupt_and_restore_falls_back(
        workspace: Workspace, s3: Any) -> None:
    sets = make_sets(workspace)  # step_1 older, step_2 newer; model.pt and optim.pt each
    size = len(sets["step_2"]["optim.pt"])
    s3.put_object(Bucket=workspace.bucket, Key="run1/step_2/optim.pt", Body=os.urandom(size))
    target = workspace.root / "restored"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert "restored step_1" in result.stdout and "passed over: step_2" in result.stdout
    corrupt = named(result.stderr, "set_corrupt")
    assert [e["set"] for e in corrupt] == ["step_2"]
    assert "run1/step_2/optim.pt: checksum differs" in corrupt[0]["reason"]
    # Nothing of the corrupt set lands, not even its good file; no temporary file is left.
    assert restored_files(target) == {"step_1/model.pt", "step_1/optim.pt"}
    for name, data in sets["step_1"].items():
        assert (target / "step_1" / name).read_bytes() == data

    s3.put_object(Bucket=workspace.bucket, Key="run1/step_1/model.pt",
                  Body=os.urandom(len(sets["step_1"]["model.pt"])))
    elsewhere = workspace.root / "elsewhere"
    result = restore(workspace, "--to", str(elsewhere))
    assert result.returncode == 1  # no set is left: nothing restored is a failure
    assert result.stderr.strip().splitlines()[-1].startswith(
        "spotwatch: error: no complete checkpoint set")
    assert [(e["set"], e["action"]) for e in named(result.stderr, "set_corrupt")] == [
        ("step_2", "trying the next older set"), ("step_1", "none left to try")]
    assert not elsewhere.exists() or restored_files(elsewhere) == set()
    chosen = restore(workspace, "--set", "step_2", "--to", str(elsewhere))
    assert chosen.returncode == 1
    assert [e["action"] for e in named(chosen.stderr, "set_corrupt")] == ["none left to try"]


@pytest.mark.parametrize("client", ["classic", "crt"])
def test_a_response_damaged_on_the_way_is_fetched_again_not_a_corrupt_set(
        workspace: Workspace, s3: Any, proxy: FaultProxy, client: str) -> None:
    """The object intact in S3, one response to its GET damaged in transit: restore fetches it
    again and brings back the newest set, never passing it over for an older one."""
    sets = make_sets(workspace)
    workspace.write_config(transfer={"client": client})
    damaged = proxy.add("corrupt", lambda r: r.method == "GET"
                        and r.path.endswith("/run1/step_2/optim.pt"), times=1)
    target = workspace.root / "restored"
    result = workspace.cli("restore", "-c", "config.yaml", "--to", str(target),
                           AWS_ENDPOINT_URL=proxy.url)
    assert damaged.applied == 1
    assert result.returncode == 0, result.stderr
    assert "restored step_2" in result.stdout and "passed over" not in result.stdout
    assert not named(result.stderr, "set_corrupt")
    assert [e["key"] for e in named(result.stderr, "download_mismatch_retried")] == [
        "run1/step_2/optim.pt"]
    for name, data in sets["step_2"].items():
        assert (target / "step_2" / name).read_bytes() == data


def test_a_stale_local_copy_is_downloaded_again(workspace: Workspace, s3: Any) -> None:
    sets = make_sets(workspace)
    local = workspace.checkpoints / "step_2" / "model.pt"
    stat = local.stat()
    local.write_bytes(os.urandom(stat.st_size))  # same size and mtime, other bytes
    os.utime(local, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    result = restore(workspace)  # into the watched directory, over the stale copy
    assert result.returncode == 0, result.stderr
    assert "1 files downloaded" in result.stdout and "1 already present" in result.stdout
    assert local.read_bytes() == sets["step_2"]["model.pt"]
    assert "1 local files that differed replaced" in result.stdout
    assert "changed after the set was sealed" not in result.stdout  # its mtime: not newer
    [replaced] = named(result.stderr, "local_files_replaced")
    assert replaced["paths"] == ["step_2/model.pt"] and replaced["newer"] == []


def test_a_local_file_changed_after_its_set_was_sealed_is_named_when_replaced(
        workspace: Workspace, s3: Any) -> None:
    """Restored into a directory in use: work newer than S3's copy is replaced by the set, as
    asked, but never without a word."""
    sets = make_sets(workspace)
    local = workspace.checkpoints / "step_2" / "optim.pt"
    local.write_bytes(b"written after the set was sealed")
    later = local.stat().st_mtime_ns + 10**9
    os.utime(local, ns=(later, later))
    result = restore(workspace, "--to", str(workspace.checkpoints))
    assert result.returncode == 0, result.stderr
    assert local.read_bytes() == sets["step_2"]["optim.pt"]
    assert ("1 local files that differed replaced, 1 of them changed after the set was "
            "sealed: step_2/optim.pt") in result.stdout, result.stdout
    [replaced] = named(result.stderr, "local_files_replaced")
    assert replaced["newer"] == ["step_2/optim.pt"] and replaced["newer_count"] == 1


@pytest.mark.usefixtures("transfer_client")
def test_multipart_files_restore_verified_by_their_composite_checksum(
        workspace: Workspace, s3: Any) -> None:
    workspace.write_config(transfer={"multipart_threshold": "5MB", "multipart_chunksize": "5MB"})
    data = save_checkpoint(workspace.checkpoints / "step_1" / "big.pt", 11 * MiB + 3)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 1
    [entry] = json.loads(object_bytes(s3, workspace.bucket, f"{MANIFESTS}step_1.json"))["files"]
    assert entry["part_size"] == 5 * MiB  # the parts its composite checksum is over
    target = workspace.root / "restored"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert (target / "step_1" / "big.pt").read_bytes() == data


def _manifest_body(set_name: str, prefix: str, files: Any) -> bytes:
    return json.dumps({"format": 1, "set": set_name, "prefix": prefix, "files": files,
                       "sealed_at": 1.0}).encode()


def _crc32(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def test_a_manifest_cannot_widen_the_prefix(workspace: Workspace, s3: Any) -> None:
    make_sets(workspace)
    secret = b"another team's data"
    s3.put_object(Bucket=workspace.bucket, Key="other-team/secret.bin", Body=secret)
    entry = {"key": "other-team/secret.bin", "path": "other-team/secret.bin",
             "size": len(secret), "mtime_ns": 2**62, "checksum": _crc32(secret)}
    s3.put_object(Bucket=workspace.bucket, Key=f"{MANIFESTS}other-team.json",
                  Body=_manifest_body("other-team", "", [entry]))
    target = workspace.root / "restored"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert "restored step_2" in result.stdout
    assert not (target / "other-team").exists()
    skipped = named(result.stderr, "manifest_skipped")
    assert [e["key"] for e in skipped] == [f"{MANIFESTS}other-team.json"]


def _put_later(s3: Any, bucket: str, key: str, body: bytes, after: str) -> None:
    """Put key so that its LastModified is later than that of `after` (one-second clock)."""
    before = s3.head_object(Bucket=bucket, Key=after)["LastModified"]

    def later() -> bool:
        s3.put_object(Bucket=bucket, Key=key, Body=body)
        return bool(s3.head_object(Bucket=bucket, Key=key)["LastModified"] > before)

    wait_for(later, timeout=10, interval=0.2)


def test_malformed_manifests_are_skipped_and_no_bound_hides_the_newest_set(
        workspace: Workspace, s3: Any) -> None:
    sets = make_sets(workspace)
    bucket = workspace.bucket
    newest_sealed = f"{MANIFESTS}step_2.json"
    good = {"key": "run1/bad/x.pt", "path": "bad/x.pt", "size": 1, "mtime_ns": 2**62,
            "checksum": _crc32(b"x")}
    malformed = {
        "invalid-json": b'{"format": 1, "set": ',
        "wrong-types": _manifest_body("wrong-types", "run1/", [
            {**good, "key": "run1/wrong-types/x.pt", "path": "wrong-types/x.pt", "size": "1"}]),
        "nul-path": _manifest_body("nul-path", "run1/", [
            {**good, "key": "run1/nul-path/x\0.pt", "path": "nul-path/x\0.pt"}]),
        "files-not-a-list": _manifest_body("files-not-a-list", "run1/", "x"),
        "not-utf8": b"\xff\xfe{}",
        "named-for-another-set": _manifest_body("step_1", "run1/", [
            {**good, "key": "run1/step_1/x.pt", "path": "step_1/x.pt"}]),
    }
    s3.put_object(Bucket=bucket, Key="run1/bad/x.pt", Body=b"x")
    _put_later(s3, bucket, f"{MANIFESTS}invalid-json.json", malformed.pop("invalid-json"),
               after=newest_sealed)
    for name, body in malformed.items():
        s3.put_object(Bucket=bucket, Key=f"{MANIFESTS}{name}.json", Body=body)
    # Many older, complete sets whose manifests were written after the newest set's.
    for number in range(60):
        name = f"old_{number:02}"
        s3.put_object(Bucket=bucket, Key=f"run1/{name}/m.pt", Body=b"old")
        manifest = Manifest.build(name, "run1/", [
            ManifestEntry(f"run1/{name}/m.pt", f"{name}/m.pt", 3, number, _crc32(b"old"))])
        s3.put_object(Bucket=bucket, Key=manifest_key("run1/", name),
                      Body=manifest.to_json().encode())

    target = workspace.root / "restored"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "restored step_2" in result.stdout
    assert (target / "step_2" / "model.pt").read_bytes() == sets["step_2"]["model.pt"]
    skipped = {e["key"].rsplit("/", 1)[1] for e in named(result.stderr, "manifest_skipped")}
    assert skipped == {f"{name}.json" for name in (*malformed, "invalid-json")}


@pytest.mark.parametrize("below", [False, True])
def test_restore_to_a_regular_file_is_a_usage_error(workspace: Workspace, below: bool) -> None:
    make_sets(workspace)
    existing = workspace.root / "notes.txt"
    existing.write_text("keep me")
    to = existing / "sub" if below else existing
    result = restore(workspace, "--to", str(to))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"spotwatch: error: cannot restore into {to}: "
                                     f"{existing} is not a directory")
    assert existing.read_text() == "keep me"


def test_a_directory_where_a_file_goes_stops_restore_before_anything_lands(
        workspace: Workspace) -> None:
    make_sets(workspace)
    target = workspace.root / "restored"
    (target / "step_2" / "optim.pt").mkdir(parents=True)  # the user's, where a file goes
    (target / "step_2" / "optim.pt" / "notes.txt").write_text("mine")
    (target / "step_2" / "model.pt").write_bytes(b"the model before")
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"spotwatch: error: cannot restore 'step_2/optim.pt': {target}/step_2/optim.pt is a "
        f"directory")
    # Nothing of the set landed beside it: the destination is as it was.
    assert restored_files(target) == {"step_2/model.pt", "step_2/optim.pt/notes.txt"}
    assert (target / "step_2" / "model.pt").read_bytes() == b"the model before"
    assert (target / "step_2" / "optim.pt" / "notes.txt").read_text() == "mine"


def test_a_file_where_a_folder_goes_stops_restore_before_anything_lands(
        workspace: Workspace) -> None:
    for name in ("model.pt", "optim/state.pt"):
        path = workspace.checkpoints / "step_1" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())
    assert workspace.cli("flush", "-c", "config.yaml").returncode == 0
    target = workspace.root / "restored"
    (target / "step_1").mkdir(parents=True)
    (target / "step_1" / "optim").write_text("the user's file")  # where the set has a folder
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"spotwatch: error: cannot restore 'step_1/optim/state.pt': {target}/step_1/optim is a "
        f"file, not a directory")
    assert restored_files(target) == {"step_1/optim"}
    assert (target / "step_1" / "optim").read_text() == "the user's file"


def test_restore_to_an_empty_path_is_a_usage_error_not_the_current_directory(
        workspace: Workspace) -> None:
    make_sets(workspace)
    before = set(workspace.root.iterdir())
    result = restore(workspace, "--to", "")  # `--to "$DIR"` with DIR unset
    assert result.returncode == 2
    assert result.stderr == ("spotwatch restore: error: argument --to: an empty path (is a "
                             "shell variable unset?) (see 'spotwatch restore --help')\n")
    assert set(workspace.root.iterdir()) == before  # nothing restored into the working dir


@pytest.fixture
def proxy() -> Any:
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as fault_proxy:
        yield fault_proxy


def _fail_uploads_of(proxy: FaultProxy, suffix: str) -> None:
    def matches(request: Request) -> bool:
        return request.operation == "PutObject" and request.path.endswith(suffix)

    proxy.add("500", matches, times=10_000)


def test_a_set_with_a_file_given_up_gets_no_manifest(workspace: Workspace, s3: Any,
                                                     proxy: FaultProxy) -> None:
    workspace.write_config(transfer={"max_attempts": 1})
    sets = make_sets(workspace)  # step_1 and step_2, sealed
    newer = {name: save_checkpoint(workspace.checkpoints / "step_3" / name, 2_000)
             for name in ("model.pt", "optim.pt")}
    _fail_uploads_of(proxy, "/run1/step_3/optim.pt")
    flush = workspace.cli("flush", "-c", "config.yaml", AWS_ENDPOINT_URL=proxy.url)
    assert flush.returncode == 1
    assert object_bytes(s3, workspace.bucket, "run1/step_3/model.pt") == newer["model.pt"]
    assert f"{MANIFESTS}step_3.json" not in keys_in(s3, workspace.bucket)
    incomplete = named(flush.stderr, "set_incomplete")
    assert incomplete and incomplete[-1]["set"] == "run1/step_3"
    assert incomplete[-1]["missing"] == ["step_3/optim.pt"]
    status = json.loads((workspace.root / "state" / "status.json").read_text())
    assert status["incomplete_sets"] == ["run1/step_3"]

    target = workspace.root / "restored"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert "restored step_2" in result.stdout
    assert (target / "step_2" / "optim.pt").read_bytes() == sets["step_2"]["optim.pt"]

    # Once the file gets through, the set is sealed with every file and reported no more.
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 1
    manifest = Manifest.from_json(object_bytes(s3, workspace.bucket, f"{MANIFESTS}step_3.json"),
                                  "run1/")
    assert {f.path for f in manifest.files} == {"step_3/model.pt", "step_3/optim.pt"}
    status = json.loads((workspace.root / "state" / "status.json").read_text())
    assert status["incomplete_sets"] == []


def test_incomplete_sets_show_in_status_and_metrics(workspace: Workspace, s3: Any,
                                                    proxy: FaultProxy,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    workspace.write_config(transfer={"max_attempts": 1})
    for name in ("a.pt", "b.pt"):
        save_checkpoint(workspace.checkpoints / "step_1" / name, 1_000)
    _fail_uploads_of(proxy, "/run1/step_1/b.pt")
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    config = load_config(workspace.config_file)
    daemon = Daemon(config, workspace.bucket, make_s3_client(config.region, config.transfer))
    outcome = daemon.flush_once()
    assert outcome.failed == 1
    assert daemon.metrics.registry.get_sample_value("spotwatch_incomplete_sets") == 1
    status = json.loads(daemon.state.status.read_text())
    assert status["incomplete_sets"] == ["run1/step_1"]
    shown = render_status({"bucket": workspace.bucket, "daemon_pid": 1, "daemon": status,
                           "uploaded_objects": 1, "uploaded_bytes": 1_000,
                           "last_upload_at": None})
    assert "incomplete:   1 sets without a manifest (a file is not in S3): run1/step_1" in shown


def _newer_set(s3: Any, bucket: str, name: str, files: dict[str, bytes],
               mtime_ns: int = 2**62) -> None:
    """A set whose objects are all in S3, with a manifest claiming the newest checkpoint."""
    entries = []
    for path, data in files.items():
        s3.put_object(Bucket=bucket, Key=f"run1/{path}", Body=data)
        entries.append({"key": f"run1/{path}", "path": path, "size": len(data),
                        "mtime_ns": mtime_ns, "checksum": _crc32(data)})
    s3.put_object(Bucket=bucket, Key=f"{MANIFESTS}{name}.json",
                  Body=_manifest_body(name, "run1/", entries))


def test_a_manifest_no_restore_could_write_is_skipped_not_fatal(workspace: Workspace,
                                                               s3: Any) -> None:
    """A newer set whose manifest lists a path both as a file and as a directory, or a time
    no file system can hold, is skipped like any malformed one: the newest good set is
    restored, with no traceback and nothing of the skipped sets left behind."""
    sets = make_sets(workspace)
    bucket = workspace.bucket
    _newer_set(s3, bucket, "clash", {"clash/a": b"file", "clash/a/b": b"below it"})
    _newer_set(s3, bucket, "deep_clash", {"deep_clash/x/y": b"f", "deep_clash/x/y/z/w": b"g"})
    _newer_set(s3, bucket, "far_future", {"far_future/m.pt": b"m"}, mtime_ns=10**30)
    _newer_set(s3, bucket, "before_time", {"before_time/m.pt": b"m"}, mtime_ns=-(2**63) - 1)
    target = workspace.root / "restored"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "restored step_2" in result.stdout
    assert restored_files(target) == {"step_2/model.pt", "step_2/optim.pt"}
    assert list(target.iterdir()) == [target / "step_2"]
    assert (target / "step_2" / "model.pt").read_bytes() == sets["step_2"]["model.pt"]
    skipped = {e["key"] for e in named(result.stderr, "manifest_skipped")}
    assert skipped == {f"{MANIFESTS}{name}.json"
                       for name in ("clash", "deep_clash", "far_future", "before_time")}


def test_spotwatch_key_space_in_a_watched_directory_is_never_a_checkpoint(
        workspace: Workspace, s3: Any) -> None:
    """Manifests brought into the watched directory (e.g. by `aws s3 sync` of the prefix)
    are neither uploaded over the real ones nor sealed and restored as the newest set."""
    sets = make_sets(workspace)
    bucket = workspace.bucket
    real = object_bytes(s3, bucket, f"{MANIFESTS}step_2.json")
    local = workspace.checkpoints / ".spotwatch" / "manifests"
    local.mkdir(parents=True)
    (local / "step_1.json").write_bytes(object_bytes(s3, bucket, f"{MANIFESTS}step_1.json"))
    forged = json.loads(real)
    forged["files"] = forged["files"][:1]  # a stale or edited copy: one file fewer
    (local / "step_2.json").write_text(json.dumps(forged))
    (workspace.checkpoints / ".spotwatch" / "probe-host").write_bytes(b"x")
    before = keys_in(s3, bucket)

    flush = workspace.cli("flush", "-c", "config.yaml")
    assert flush.returncode == 0, flush.stderr
    assert flush_summary(flush)["files"] == 0
    assert keys_in(s3, bucket) == before
    assert object_bytes(s3, bucket, f"{MANIFESTS}step_2.json") == real

    # A set of that name sealed by an older spotwatch is refused on reading.
    _newer_set(s3, bucket, ".spotwatch", {".spotwatch/notes.bin": b"not a checkpoint"})
    target = workspace.root / "restored"
    result = restore(workspace, "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert "restored step_2" in result.stdout
    assert restored_files(target) == {"step_2/model.pt", "step_2/optim.pt"}
    assert (target / "step_2" / "optim.pt").read_bytes() == sets["step_2"]["optim.pt"]
    assert [e["key"] for e in named(result.stderr, "manifest_skipped")] == [
        f"{MANIFESTS}.spotwatch.json"]


@pytest.mark.parametrize("name", ["", ".", "..", "step_1/model.pt", ".spotwatch"])
def test_restore_of_a_set_name_no_set_can_have_is_a_usage_error(workspace: Workspace,
                                                                name: str) -> None:
    result = restore(workspace, "--set", name)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--set takes the name of one checkpoint set" \
        in result.stderr


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP])
def test_a_restore_stopped_by_a_signal_leaves_no_partial_download(
        workspace: Workspace, transfer_client: str, stop: signal.Signals) -> None:
    """A supervisor's stop (SIGTERM, as `timeout` or systemd send) or a closed session
    (SIGHUP) ends a restore as Ctrl-C does: no temporary, and no folder made for it, stays."""
    step = workspace.checkpoints / "step_1"
    step.mkdir()
    for index in range(3):
        (step / f"shard_{index}.pt").write_bytes(os.urandom(40 * MiB))
    workspace.write_config(transfer={"client": transfer_client, "max_concurrency": 1,
                                     "multipart_threshold": "5MB",
                                     "multipart_chunksize": "5MB"})
    flushed = workspace.cli("flush", "-c", "config.yaml")
    assert flushed.returncode == 0, flushed.stderr
    target = workspace.root / "restored"
    restoring = subprocess.Popen(
        [sys.executable, "-m", "spotwatch.cli", "restore", "-c", "config.yaml", "--to",
         str(target)], cwd=workspace.root, env=workspace.env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: target.is_dir() and any(target.rglob("*.spotwatch-restore")),
             interval=0.01)
    restoring.send_signal(stop)
    _, stderr = restoring.communicate(timeout=60)
    assert restoring.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert not target.exists() or not any(target.iterdir())


@pytest.mark.usefixtures("transfer_client")
@pytest.mark.parametrize("link", ["symlink", "hard link"])
def test_a_link_at_a_temporarys_name_is_never_written_through(workspace: Workspace,
                                                              link: str) -> None:
    """Whatever waits at a temporary's name (a link another user of a shared checkpoint
    directory left there, to a file outside it) is not written through: restore, often run
    as root from user-data, writes only under its target, and puts no link in a file's place.
    Both ways a file comes down: one GET (the CRT's below the multipart threshold) and ranged
    GETs."""
    workspace.write_config(transfer={"multipart_threshold": "5MB", "multipart_chunksize": "5MB"})
    saved = {name: save_checkpoint(workspace.checkpoints / "step_1" / name, size)
             for name, size in (("small.pt", 3_000), ("big.pt", 6 * MiB))}
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    target = workspace.root / "restored"
    (target / "step_1").mkdir(parents=True)
    outside = workspace.root / "outside"
    outside.mkdir()
    for name in saved:
        (outside / name).write_bytes(b"not the restore's")
        temp = temporary(target / "step_1" / name)
        if link == "symlink":
            temp.symlink_to(outside / name)
        else:
            temp.hardlink_to(outside / name)

    result = workspace.cli("restore", "-c", "config.yaml", "--to", str(target))
    assert result.returncode == 0, result.stderr
    for name, data in saved.items():
        assert (outside / name).read_bytes() == b"not the restore's"
        restored = target / "step_1" / name
        assert not restored.is_symlink() and restored.stat().st_nlink == 1
        assert restored.read_bytes() == data


def test_temporaries_a_killed_restore_left_are_removed_by_the_next_and_never_uploaded(
        workspace: Workspace, s3: Any, proxy: FaultProxy) -> None:
    """kill -9 (or a power loss) gives a restore no chance to remove its temporaries. A flush
    never uploads them, and the next restore into the tree removes them, also when it restores
    another set (one sealed meanwhile) and so downloads nothing over them."""
    step_2 = workspace.checkpoints / "step_2"
    for name in ("model.pt", "optim.pt"):
        save_checkpoint(step_2 / name, 100_000)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 2
    shutil.rmtree(step_2)  # a new instance, restoring into the watched directory
    held = proxy.add("delay", lambda r: r.method == "GET" and r.path.endswith("step_2/optim.pt"),
                     times=1000, delay=30)
    restoring = subprocess.Popen(
        [sys.executable, "-m", "spotwatch.cli", "restore", "-c", "config.yaml"],
        cwd=workspace.root, env=workspace.env(AWS_ENDPOINT_URL=proxy.url),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    landed = temporary(step_2 / "model.pt")  # optim.pt's download is held meanwhile
    wait_for(lambda: held.applied and landed.is_file() and landed.stat().st_size == 100_000,
             timeout=60, interval=0.01)
    restoring.kill()
    restoring.wait()
    left = {p for p in workspace.checkpoints.rglob("*") if is_restore_temporary(p.name)}
    assert landed in left
    proxy.rules.clear()

    newer = save_checkpoint(workspace.checkpoints / "step_3" / "model.pt", 100_000)
    assert flush_summary(workspace.cli("flush", "-c", "config.yaml"))["files"] == 1
    assert not [key for key in keys_in(s3, workspace.bucket) if RESTORE_TEMP_SUFFIX in key]
    shutil.rmtree(workspace.checkpoints / "step_3")
    result = restore(workspace)
    assert result.returncode == 0, result.stderr
    assert "restored step_3" in result.stdout and "1 files downloaded" in result.stdout
    assert restored_files(workspace.checkpoints) == {"step_3/model.pt"}
    assert (workspace.checkpoints / "step_3" / "model.pt").read_bytes() == newer
    assert {e["path"] for e in named(result.stderr, "stale_temporary_removed")} == {
        str(p) for p in left}


@pytest.mark.parametrize("client", ["classic", "crt"])
@pytest.mark.parametrize("fault", ["short", "truncate"])
def test_a_manifest_read_cut_off_once_is_read_again(
        workspace: Workspace, proxy: FaultProxy, client: str, fault: str) -> None:
    """One dropped connection mid-body on the newest manifest's GET: its body is asked for
    again, and the restore goes on (old: exit 1, `cannot read ...: IncompleteRead`)."""
    workspace.write_config(transfer={"client": client})
    sets = make_sets(workspace)

    def manifest_read(request: Request) -> bool:
        return request.method == "GET" and request.path.endswith("/manifests/step_2.json")

    proxy.add(fault, manifest_read)
    target = workspace.root / "restored"
    result = workspace.cli("restore", "-c", "config.yaml", "--to", str(target),
                           AWS_ENDPOINT_URL=proxy.url)
    assert result.returncode == 0, result.stderr
    assert "restored step_2" in result.stdout
    assert (target / "step_2" / "model.pt").read_bytes() == sets["step_2"]["model.pt"]
    assert proxy.count("GET", fault) == 1
