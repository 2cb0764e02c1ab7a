"""Security: symlinks never followed out of a watched tree, keys never escape the prefix,
credentials never logged, server-side encryption on upload, and a least-privilege IAM policy
that covers every S3 call spotwatch makes."""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import boto3
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from spotwatch.aws.preflight import run_checks
from spotwatch.aws.store import S3ObjectStore
from spotwatch.commands.iam_policy import OPERATION_ACTIONS, policy_for
from spotwatch.config import load_config
from spotwatch.daemon.loop import Daemon
from spotwatch.keys import job_key_space, manifest_key, object_key
from spotwatch.model import Notice, NoticeKind
from spotwatch.notices.peers import PeerChannel, PeerPoller, channel_prefix
from spotwatch.state import StateDir
from spotwatch.sync.ledger import Ledger
from spotwatch.sync.pruner import prune_once
from spotwatch.sync.restore.run import restore
from spotwatch.sync.sets.manifest import Manifest, ManifestEntry

from .conftest import Workspace, keys_in, object_bytes
from .test_daemon_e2e import flush_summary, save_checkpoint

MiB = 2**20


def test_symlinks_out_of_the_tree_are_never_uploaded(workspace: Workspace, s3: Any) -> None:
    outside = workspace.root / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.pt").write_bytes(b"not a checkpoint")
    (outside / "dir" / "inner.pt").write_bytes(b"nor this")
    (workspace.checkpoints / "early_link.pt").symlink_to(outside / "secret.pt")
    (workspace.checkpoints / "early_dir").symlink_to(outside / "dir")
    daemon = workspace.start_daemon()
    (workspace.checkpoints / "late_link.pt").symlink_to(outside / "secret.pt")
    (workspace.checkpoints / "late_dir").symlink_to(outside / "dir", target_is_directory=True)
    (outside / "dir" / "written_later.pt").write_bytes(b"still outside")
    data = save_checkpoint(workspace.checkpoints / "real.pt", 4_000)
    daemon.wait_for_event("upload_done")
    assert daemon.stop() == 0
    files = {k for k in keys_in(s3, workspace.bucket) if "/.spotwatch/" not in k}
    assert files == {"run1/real.pt"}
    assert object_bytes(s3, workspace.bucket, "run1/real.pt") == data


@pytest.mark.parametrize("relative", ["../x", "a/../../x", "/etc/passwd", "a/.."])
def test_keys_never_escape_the_prefix(relative: str) -> None:
    with pytest.raises(ValueError, match="escapes"):
        object_key("run1/", relative)


@pytest.mark.parametrize(("key", "path", "message"), [
    ("run1/evil/x.pt", "../../evil.pt", "not a clean path"),
    ("elsewhere/x.pt", "evil/x.pt", "is not 'run1/evil/x.pt'"),
])
def test_restore_refuses_manifests_that_point_outside(workspace: Workspace, s3: Any, key: str,
                                                      path: str, message: str) -> None:
    s3.put_object(Bucket=workspace.bucket, Key=key, Body=b"payload")
    manifest = Manifest.build("evil", "run1/", [ManifestEntry(key, path, 7, 1, None)])
    s3.put_object(Bucket=workspace.bucket, Key=manifest_key("run1/", "evil"),
                  Body=manifest.to_json().encode())
    target = workspace.root / "restored" / "deep"
    result = workspace.cli("restore", "-c", "config.yaml", "--to", str(target))
    assert result.returncode == 1
    warning, error = result.stderr.strip().splitlines()  # the manifest is skipped, no set left
    assert message in json.loads(warning)["reason"]
    assert error.startswith("spotwatch: error: no complete checkpoint set")
    assert not (workspace.root / "evil.pt").exists() and not target.exists()


def test_credentials_are_never_logged(workspace: Workspace) -> None:
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    env = {"AWS_SECRET_ACCESS_KEY": secret, "AWS_SESSION_TOKEN": "session-" + secret}
    check = workspace.cli("check", "-c", "config.yaml", **env)
    assert check.returncode == 0, check.stdout + check.stderr
    daemon = workspace.start_daemon(**env)
    save_checkpoint(workspace.checkpoints / "a.pt", 1_000)
    daemon.wait_for_event("upload_done")
    assert daemon.stop() == 0
    for text in (check.stdout, check.stderr, daemon.log_path.read_text()):
        assert secret not in text
        assert "testing" not in text  # the access key id is shown by its last 4 characters


@pytest.mark.usefixtures("transfer_client")
@pytest.mark.parametrize(("sse", "key_id"), [("AES256", None), ("aws:kms", "alias/ckpt")])
def test_uploads_ask_for_server_side_encryption(workspace: Workspace, s3: Any, sse: str,
                                                key_id: str | None) -> None:
    workspace.write_config(transfer={"sse": sse, "sse_kms_key_id": key_id,
                                     "multipart_threshold": "5MB",
                                     "multipart_chunksize": "5MB"})
    save_checkpoint(workspace.checkpoints / "step_1" / "small.pt", 1_000)
    save_checkpoint(workspace.checkpoints / "step_1" / "big.pt", 6 * MiB)
    flush_summary(workspace.cli("flush", "-c", "config.yaml"))
    for key in ("run1/step_1/small.pt", "run1/step_1/big.pt", manifest_key("run1/", "step_1")):
        head = s3.head_object(Bucket=workspace.bucket, Key=key)
        assert head["ServerSideEncryption"] == sse, key
        if key_id:
            assert key_id in head["SSEKMSKeyId"]
    check = workspace.cli("check", "-c", "config.yaml")
    assert f"uploads: {sse}" in check.stdout


def test_sse_config_errors(workspace: Workspace) -> None:
    workspace.write_config(transfer={"sse": "rot13"})
    result = workspace.cli("check", "-c", "config.yaml")
    assert result.returncode == 2 and "transfer.sse" in result.stderr
    workspace.write_config(transfer={"sse_kms_key_id": "abc"})
    result = workspace.cli("check", "-c", "config.yaml")
    assert result.returncode == 2
    assert "needs 'transfer.sse: aws:kms'" in result.stderr


# -- IAM policy --------------------------------------------------------------------------


@pytest.fixture
def s3_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """Every S3 operation (name, parameters) made by clients created during the test."""
    calls: list[tuple[str, dict[str, Any]]] = []
    original = boto3.session.Session.client

    def client(self: boto3.session.Session, *args: Any, **kwargs: Any) -> Any:
        made = original(self, *args, **kwargs)

        def record(params: dict[str, Any], model: Any, **_: Any) -> None:
            calls.append((model.name, dict(params)))

        made.meta.events.register("before-parameter-build.s3", record)
        return made

    monkeypatch.setattr(boto3.session.Session, "client", client)
    yield calls


def allowed(policy: dict[str, Any], action: str, resource: str, prefix: str | None) -> bool:
    for statement in policy["Statement"]:
        actions = statement["Action"]
        resources = statement["Resource"]
        if action not in ([actions] if isinstance(actions, str) else actions):
            continue
        if not any(fnmatch.fnmatchcase(resource, pattern) for pattern in
                   ([resources] if isinstance(resources, str) else resources)):
            continue
        condition = statement.get("Condition", {}).get("StringLike", {}).get("s3:prefix")
        if condition and not any(fnmatch.fnmatchcase(prefix or "", p) for p in condition):
            continue
        return True
    return False


def actions_allowed(policy: dict[str, Any], bucket: str,
                    s3_calls: list[tuple[str, dict[str, Any]]]) -> set[str]:
    """The IAM actions of the calls made on the bucket, each checked to be allowed."""
    used: set[str] = set()
    for operation, params in s3_calls:
        if params.get("Bucket") != bucket:
            continue  # the test's own setup calls
        action = OPERATION_ACTIONS[operation]
        used.add(action)
        keys = ([o["Key"] for o in params["Delete"]["Objects"]] if "Delete" in params
                else [params.get("Key")])
        for key in keys:
            resource = f"arn:aws:s3:::{bucket}" + (f"/{key}" if key else "")
            assert allowed(policy, action, resource, params.get("Prefix")), (operation, params)
    return used


@pytest.mark.parametrize("job", [None, {"id": "j1", "nodes": 1, "rank": 0}])
def test_iam_policy_covers_every_call_and_grants_nothing_unused(
        workspace: Workspace, s3: Any, s3_calls: list[tuple[str, dict[str, Any]]],
        job: dict[str, Any] | None) -> None:
    # On a job (here of one node, so that its sets are complete) parts are read and written too.
    workspace.write_config(sync={"delete": True, "keep_sets": 1},
                           transfer={"multipart_threshold": "5MB", "multipart_chunksize": "5MB"},
                           **({} if job is None else {"job": job}))
    result = workspace.cli("iam-policy", "-c", "config.yaml")
    assert result.returncode == 0, result.stderr
    policy = json.loads(result.stdout)
    config = load_config(workspace.config_file)
    bucket = workspace.bucket

    # Everything spotwatch does, in this process so that its calls are seen.
    assert all(r.ok for r in run_checks(config, bucket))
    orphan = s3.create_multipart_upload(Bucket=bucket, Key="run1/step_1/big.pt")
    ledger = Ledger(StateDir(config.state_dir).ledger)
    ledger.multipart_started(bucket, "run1/step_1/big.pt")
    ledger.close()
    save_checkpoint(workspace.checkpoints / "step_1" / "big.pt", 6 * MiB)
    save_checkpoint(workspace.checkpoints / "step_2" / "small.pt", 1_000)
    assert Daemon(config, bucket).flush_once().exit_code == 0
    restore(config, bucket, to=workspace.root / "restored")
    (workspace.checkpoints / "step_2" / "small.pt").unlink()
    assert prune_once(config, bucket, True, 1, dry_run=False)
    assert orphan["UploadId"] not in str(s3.list_multipart_uploads(Bucket=bucket))

    used = actions_allowed(policy, bucket, s3_calls)
    granted = set()
    for statement in policy["Statement"]:
        actions = statement["Action"]
        granted.update([actions] if isinstance(actions, str) else actions)
    assert granted == used
    if job is not None:
        parts = job_key_space("run1/", job["id"]) + "parts/"
        touched = {(operation, str(params.get("Key") or params.get("Prefix")))
                   for operation, params in s3_calls}
        assert {("PutObject", parts + "step_2/node-0.json"), ("ListObjectsV2", parts),
                ("GetObject", parts + "step_2/node-0.json")} <= touched


def test_iam_policy_limits_deletes_to_the_prefixes(workspace: Workspace) -> None:
    # Also without sync.delete: a file deleted while it uploads has its object deleted again.
    policy = json.loads(workspace.cli("iam-policy", "-c", "config.yaml").stdout)
    delete = next(s for s in policy["Statement"] if s["Action"] == "s3:DeleteObject")
    assert delete["Resource"] == [f"arn:aws:s3:::{workspace.bucket}/run1/*"]
    workspace.write_config(transfer={"sse": "aws:kms", "sse_kms_key_id": "1234abcd"})
    policy = json.loads(workspace.cli("iam-policy", "-c", "config.yaml").stdout)
    kms = policy["Statement"][-1]
    assert kms["Action"] == ["kms:GenerateDataKey", "kms:Decrypt"]
    assert kms["Resource"] == "arn:aws:kms:us-west-2:*:key/1234abcd"


def test_iam_policy_covers_the_peer_notice_channel(
        workspace: Workspace, s3_calls: list[tuple[str, dict[str, Any]]]) -> None:
    """A node of a job publishes, cleans up and polls its peers' notices with only the
    permissions `iam-policy` prints."""
    workspace.write_config(job={"id": "llama", "nodes": 2, "rank": 0})
    policy = json.loads(workspace.cli("iam-policy", "-c", "config.yaml").stdout)
    config = load_config(workspace.config_file)
    store = S3ObjectStore(boto3.client("s3", region_name=config.region), workspace.bucket,
                          config.transfer)
    nodes = [PeerChannel(store, channel_prefix(config), rank) for rank in (0, 1)]
    poller = PeerPoller(nodes[1], 1.0, lambda notice: None, datetime.now(UTC))
    assert poller.poll_once() == []  # no bell yet: a 404, not a 403
    nodes[0].remove_own()
    nodes[0].add(Notice.make(NoticeKind.REBALANCE, None, "now"))
    nodes[0].write()
    assert [n.peer_rank for n in poller.poll_once()] == [0]
    assert actions_allowed(policy, workspace.bucket, s3_calls) == {
        "s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"}


def iam_pattern(pattern: str) -> re.Pattern[str]:
    """How IAM matches a resource or StringLike value: '*' any run of characters, '?' one,
    '${*}', '${?}' and '${$}' the character itself."""
    parts = re.split(r"(\$\{[*?$]\}|[*?])", pattern)
    wildcards = {"*": ".*", "?": "."}
    return re.compile("".join(
        wildcards.get(part) or re.escape(part[2] if part.startswith("${") else part)
        for part in parts), re.DOTALL)


def granted_object_patterns(policy: dict[str, Any], bucket: str) -> list[re.Pattern[str]]:
    statement = next(s for s in policy["Statement"] if s["Sid"] == "ReadWriteCheckpoints")
    return [iam_pattern(resource) for resource in statement["Resource"]]


def listed_prefix_patterns(policy: dict[str, Any]) -> list[re.Pattern[str]]:
    statement = next(s for s in policy["Statement"] if s["Sid"] == "ListCheckpointPrefixes")
    return [iam_pattern(value)
            for value in statement["Condition"]["StringLike"]["s3:prefix"]]


@given(prefix=st.text(st.sampled_from("ab*?$/{}-"), min_size=1, max_size=8),
       name=st.text(st.sampled_from("ab*?$/"), max_size=6), position=st.integers(0, 8),
       other=st.sampled_from("aZ*?$/"))
def test_iam_policy_grants_the_prefix_as_written(tmp_path_factory: pytest.TempPathFactory,
                                                 prefix: str, name: str, position: int,
                                                 other: str) -> None:
    # A '*' or '?' in a prefix is a character of the key, never a wildcard of the grant.
    assume(not prefix.startswith("/"))  # refused: a key prefix is relative
    config_file = tmp_path_factory.mktemp("iam") / "config.yaml"
    config_file.write_text(json.dumps({"watch": [{"path": "ckpt", "prefix": prefix}]}))
    policy = policy_for(load_config(config_file), "bkt")
    space = object_key(prefix, "")
    objects, listings = granted_object_patterns(policy, "bkt"), listed_prefix_patterns(policy)
    assert any(p.fullmatch(f"arn:aws:s3:::bkt/{space}{name}") for p in objects)
    assert any(p.fullmatch(f"{space}{name}") for p in listings)
    index = position % len(space)
    outside = space[:index] + other + space[index + 1:]
    if not outside.startswith(space):
        assert not any(p.fullmatch(f"arn:aws:s3:::bkt/{outside}{name}") for p in objects)
        assert not any(p.fullmatch(f"{outside}{name}") for p in listings)
