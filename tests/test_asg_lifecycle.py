"""ASG lifecycle hooks against moto's Auto Scaling API (over HTTP, through tests/asgproxy.py for
the two lifecycle calls moto lacks): heartbeats while the flush runs, CONTINUE once durable."""

from __future__ import annotations

import json
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from spotwatch.aws.autoscaling import LifecycleAction, make_autoscaling_client
from spotwatch.config import AsgSettings, ImdsSettings, load_config
from spotwatch.emulator import ImdsEmulator
from spotwatch.errors import ConfigError
from spotwatch.model import Notice, NoticeKind
from tests.asgproxy import AutoScalingProxy, LifecycleCall
from tests.conftest import REGION, Daemon, Workspace, keys_in, wait_for
from tests.faultproxy import FaultProxy
from tests.test_daemon_e2e import save_checkpoint
from tests.test_peer_notices_e2e import publish_as_peer

HEARTBEAT = "RecordLifecycleActionHeartbeat"
COMPLETE = "CompleteLifecycleAction"
GROUP_TAG = "aws:autoscaling:groupName"


@pytest.fixture
def moto_asg(s3_endpoint: str) -> Any:
    return boto3.client("autoscaling", endpoint_url=s3_endpoint, region_name=REGION)


@pytest.fixture
def group(s3_endpoint: str, moto_asg: Any) -> tuple[str, str, str]:
    """A one-instance Auto Scaling group with a termination hook: (group, hook, instance id)."""
    name = f"train-{uuid.uuid4().hex[:8]}"
    ec2 = boto3.client("ec2", endpoint_url=s3_endpoint, region_name=REGION)
    image = ec2.describe_images()["Images"][0]["ImageId"]
    ec2.create_launch_template(LaunchTemplateName=f"lt-{name}", LaunchTemplateData={
        "ImageId": image, "InstanceType": "g5.xlarge"})
    moto_asg.create_auto_scaling_group(
        AutoScalingGroupName=name, LaunchTemplate={"LaunchTemplateName": f"lt-{name}"},
        MinSize=1, MaxSize=1, DesiredCapacity=1, AvailabilityZones=[f"{REGION}a"])
    moto_asg.put_lifecycle_hook(LifecycleHookName="drain", AutoScalingGroupName=name,
                                LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
                                HeartbeatTimeout=30, DefaultResult="ABANDON")
    groups = moto_asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])
    return name, "drain", groups["AutoScalingGroups"][0]["Instances"][0]["InstanceId"]


@pytest.fixture
def proxy(s3_endpoint: str, moto_asg: Any, monkeypatch: pytest.MonkeyPatch
          ) -> Iterator[AutoScalingProxy]:
    with AutoScalingProxy(s3_endpoint, moto_asg) as running:
        monkeypatch.setenv("AWS_ENDPOINT_URL_AUTO_SCALING", running.url)
        yield running


def test_lifecycle_action_finds_its_group_heartbeats_then_continues_once(
        imds: ImdsEmulator, group: tuple[str, str, str], proxy: AutoScalingProxy) -> None:
    name, hook, instance = group
    imds.set_instance(instance)  # no tags in IMDS: the group comes from the Auto Scaling API
    action = LifecycleAction(AsgSettings(lifecycle_hook=hook, heartbeat_interval=1),
                             ImdsSettings(endpoint=imds.url), make_autoscaling_client(REGION))
    action.begin()
    wait_for(lambda: len(proxy.named(HEARTBEAT)) >= 2)
    assert proxy.named(COMPLETE) == []
    action.complete("test", wait=10)
    action.complete("again", wait=10)
    [completed] = proxy.named(COMPLETE)
    assert completed.params == {"LifecycleHookName": hook, "AutoScalingGroupName": name,
                                "InstanceId": instance, "LifecycleActionResult": "CONTINUE"}


def test_a_refused_lifecycle_call_is_only_a_warning(
        imds: ImdsEmulator, group: tuple[str, str, str], proxy: AutoScalingProxy,
        capsys: pytest.CaptureFixture[str]) -> None:
    name, _hook, instance = group
    imds.set_instance(instance, {GROUP_TAG: name})
    action = LifecycleAction(AsgSettings(lifecycle_hook="no-such-hook", heartbeat_interval=1),
                             ImdsSettings(endpoint=imds.url), make_autoscaling_client(REGION))
    action.begin()
    seen: list[str] = []

    def warned() -> bool:
        captured = capsys.readouterr()
        seen.append(captured.out + captured.err)
        return "asg_lifecycle_call_failed" in "".join(seen)

    wait_for(warned)
    action.complete("test", wait=10)
    assert proxy.calls == []
    # Before the refused heartbeat: the wrong name is said to be one, not a bare IndexError.
    assert f"the group {name} has no lifecycle hook named 'no-such-hook'" in "".join(seen)


def test_replies_that_are_not_auto_scalings_are_warnings_and_the_heartbeats_go_on(
        imds: ImdsEmulator, group: tuple[str, str, str], proxy: AutoScalingProxy,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A proxy's plain-text page in Auto Scaling's place cannot be parsed, and botocore's
    error for that is no BotoCoreError: each such reply is one warning, and the action still
    heart-beats and continues the scale-in once completed."""
    _name, hook, instance = group
    imds.set_instance(instance)  # the group comes from DescribeAutoScalingInstances
    proxy.unparsable.update({"DescribeLifecycleHooks": 1, HEARTBEAT: 2})
    action = LifecycleAction(AsgSettings(lifecycle_hook=hook, heartbeat_interval=0.2),
                             ImdsSettings(endpoint=imds.url), make_autoscaling_client(REGION))
    action.begin()
    wait_for(lambda: len(proxy.named(HEARTBEAT)) >= 2)  # answered ones, after the pages
    action.complete("test", wait=10)
    [completed] = proxy.named(COMPLETE)
    assert completed.params["LifecycleActionResult"] == "CONTINUE"
    said = capsys.readouterr()
    output = said.out + said.err
    assert "asg_heartbeat_timeout_unknown" in output
    assert output.count("asg_lifecycle_call_failed") == 2
    assert "Traceback" not in output


def test_a_heartbeat_interval_not_below_the_hooks_timeout_is_halved_with_one_warning(
        imds: ImdsEmulator, group: tuple[str, str, str], proxy: AutoScalingProxy,
        moto_asg: Any, capsys: pytest.CaptureFixture[str]) -> None:
    name, _hook, instance = group
    timeout = 2  # below AWS's minimum of 30, which moto does not enforce: a quick test
    moto_asg.put_lifecycle_hook(LifecycleHookName="quick", AutoScalingGroupName=name,
                                LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
                                HeartbeatTimeout=timeout, DefaultResult="ABANDON")
    imds.set_instance(instance, {GROUP_TAG: name})
    action = LifecycleAction(AsgSettings(lifecycle_hook="quick", heartbeat_interval=5),
                             ImdsSettings(endpoint=imds.url), make_autoscaling_client(REGION))
    action.begin()
    wait_for(lambda: len(proxy.named(HEARTBEAT)) >= 4)
    action.complete("test", wait=10)
    beats = [call.at for call in proxy.named(HEARTBEAT)]
    assert all(later - earlier < timeout for earlier, later in pairwise(beats))
    output = capsys.readouterr()
    [warning] = [line for line in (output.out + output.err).splitlines()
                 if "asg_heartbeat_interval_too_long" in line]
    assert "heartbeat_timeout=2.0" in warning and "using=1.0" in warning


@pytest.mark.parametrize("state", ["Terminated", "Warmed:Stopped", "Warmed:Hibernated",
                                   "Warmed:Terminated"])
def test_scale_in_waits_for_the_checkpoint_then_continues(
        workspace: Workspace, imds: ImdsEmulator, s3: Any, group: tuple[str, str, str],
        proxy: AutoScalingProxy, state: str) -> None:
    """Scaled in, or returned to a warm pool stopped or hibernated: the instance stops, and
    the termination hook holds it until the checkpoint is in S3."""
    name, hook, instance = group
    imds.set_instance(instance, {GROUP_TAG: name})
    key = "run1/step_1/model.pt"
    proxy.on_call = lambda action: key in keys_in(s3, workspace.bucket)
    # A file written without close stays unsettled for a minute: the flush waits for it.
    workspace.write_config(sync={"quiet_seconds": 60},
                           asg={"lifecycle_hook": hook, "heartbeat_interval": 1,
                                "save_grace": 0})
    daemon = workspace.start_daemon(AWS_ENDPOINT_URL_AUTO_SCALING=proxy.url)
    (workspace.checkpoints / "step_1").mkdir()
    with (workspace.checkpoints / "step_1" / "model.pt").open("wb") as checkpoint:
        checkpoint.write(b"weights" * 1000)
        checkpoint.flush()
        imds.set_lifecycle_state(state)
        daemon.wait_for_event("flush_started")
        wait_for(lambda: len(proxy.named(HEARTBEAT)) >= 2)
        assert proxy.named(COMPLETE) == []  # still being written: the scale-in is held
    completed = wait_for(lambda: proxy.named(COMPLETE))[0]
    assert completed.note is True  # the checkpoint was in S3 when the action completed
    assert completed.params == {"LifecycleHookName": hook, "AutoScalingGroupName": name,
                                "InstanceId": instance, "LifecycleActionResult": "CONTINUE"}
    assert all(call.at < completed.at for call in proxy.named(HEARTBEAT))
    assert daemon.stop() == 0
    assert len(proxy.named(COMPLETE)) == 1
    assert not daemon.named("asg_lifecycle_completing_anyway")


@pytest.fixture
def faults(s3_endpoint: str) -> Iterator[FaultProxy]:
    with FaultProxy(s3_endpoint) as running:
        yield running


def refused_for_a_while(faults: FaultProxy, key: str, times: int) -> Any:
    """S3 refuses the file's PutObject (403 AccessDenied: failing at once) `times` times."""
    return faults.add("403", lambda r: r.operation == "PutObject" and r.path.endswith(f"/{key}"),
                      times=times)


def start_held_scale_in(workspace: Workspace, imds: ImdsEmulator, s3: Any,
                        group: tuple[str, str, str], proxy: AutoScalingProxy,
                        faults: FaultProxy, key: str) -> Any:
    """A daemon (on-notice: nothing goes before the notice) whose checkpoint S3 refuses;
    after the lifecycle notice its flush ends leaving the file failing. (daemon, when)"""
    name, hook, instance = group
    imds.set_instance(instance, {GROUP_TAG: name})
    proxy.on_call = lambda action: key in keys_in(s3, workspace.bucket)
    workspace.write_config(sync={"mode": "on-notice"},
                           asg={"lifecycle_hook": hook, "heartbeat_interval": 1,
                                "save_grace": 0})
    daemon = workspace.start_daemon(AWS_ENDPOINT_URL=faults.url,
                                    AWS_ENDPOINT_URL_AUTO_SCALING=proxy.url)
    (workspace.checkpoints / "step_1").mkdir()
    (workspace.checkpoints / "step_1" / "model.pt").write_bytes(b"weights" * 1000)
    imds.set_lifecycle_state("Terminated")
    flush = daemon.wait_for_event("flush_done")
    assert flush["failed"] == 1 and flush["reason"] == "asg-terminating"
    return daemon, time.monotonic()


def assert_continued_once_when_durable(proxy: AutoScalingProxy, group: tuple[str, str, str],
                                       failed_at: float) -> LifecycleCall:
    name, hook, instance = group
    completed = wait_for(lambda: proxy.named(COMPLETE), timeout=60)[0]
    assert completed.note is True  # the checkpoint was in S3 when the action completed
    assert completed.params == {"LifecycleHookName": hook, "AutoScalingGroupName": name,
                                "InstanceId": instance, "LifecycleActionResult": "CONTINUE"}
    beats = [call.at for call in proxy.named(HEARTBEAT)]
    assert [at for at in beats if failed_at < at < completed.at]  # held meanwhile
    assert all(at < completed.at for at in beats)
    return completed


def test_files_a_notice_flush_left_failing_continue_the_scale_in_once_retried_into_s3(
        workspace: Workspace, imds: ImdsEmulator, s3: Any, group: tuple[str, str, str],
        proxy: AutoScalingProxy, faults: FaultProxy) -> None:
    key = "run1/step_1/model.pt"
    refused_for_a_while(faults, key, times=1)
    daemon, failed_at = start_held_scale_in(workspace, imds, s3, group, proxy, faults, key)
    assert proxy.named(COMPLETE) == []  # a file failing: the scale-in stays held
    # No other flush: the file's own retry makes it durable, and that releases the scale-in.
    assert_continued_once_when_durable(proxy, group, failed_at)
    assert len(daemon.named("flush_started")) == 1
    assert daemon.stop() == 0
    assert len(proxy.named(COMPLETE)) == 1
    assert not daemon.named("asg_lifecycle_completing_anyway")


def test_a_later_flush_that_makes_the_failing_files_durable_continues_the_scale_in_once(
        workspace: Workspace, imds: ImdsEmulator, s3: Any, group: tuple[str, str, str],
        proxy: AutoScalingProxy, faults: FaultProxy) -> None:
    key = "run1/step_1/model.pt"
    refused = refused_for_a_while(faults, key, times=2)
    daemon, failed_at = start_held_scale_in(workspace, imds, s3, group, proxy, faults, key)
    wait_for(lambda: refused.applied == 2)  # its retry is refused too
    beats = len(proxy.named(HEARTBEAT))
    wait_for(lambda: len(proxy.named(HEARTBEAT)) >= beats + 2)
    assert proxy.named(COMPLETE) == [] and key not in keys_in(s3, workspace.bucket)
    done = workspace.cli("flush", "-c", "config.yaml")  # the daemon's flush retries it now
    assert done.returncode == 0, done.stderr
    assert_continued_once_when_durable(proxy, group, failed_at)
    assert daemon.stop() == 0
    assert len(proxy.named(COMPLETE)) == 1
    assert not daemon.named("asg_lifecycle_completing_anyway")


def test_final_flush_that_leaves_files_behind_still_continues_the_scale_in(
        workspace: Workspace, imds: ImdsEmulator, group: tuple[str, str, str],
        proxy: AutoScalingProxy) -> None:
    name, hook, instance = group
    imds.set_instance(instance, {GROUP_TAG: name})
    workspace.write_config(sync={"quiet_seconds": 60, "stop_timeout": 2},
                           asg={"lifecycle_hook": hook, "heartbeat_interval": 1,
                                "save_grace": 0})
    daemon = workspace.start_daemon(AWS_ENDPOINT_URL_AUTO_SCALING=proxy.url)
    (workspace.checkpoints / "step_1").mkdir()
    with (workspace.checkpoints / "step_1" / "model.pt").open("wb") as checkpoint:
        checkpoint.write(b"weights")
        checkpoint.flush()
        imds.set_lifecycle_state("Terminated")
        wait_for(lambda: proxy.named(HEARTBEAT))
        # Still being written when SIGTERM's final flush runs out of time: not durable.
        assert daemon.stop() == 1
    assert daemon.named("asg_lifecycle_completing_anyway")
    [completed] = proxy.named(COMPLETE)
    assert completed.params["LifecycleActionResult"] == "CONTINUE"


def test_a_peers_scale_in_never_holds_or_continues_this_instances_lifecycle_action(
        workspace: Workspace, imds: ImdsEmulator, s3: Any, group: tuple[str, str, str],
        proxy: AutoScalingProxy) -> None:
    name, hook, instance = group
    imds.set_instance(instance, {GROUP_TAG: name})
    own_notice = threading.Event()
    proxy.on_call = lambda action: own_notice.is_set()
    workspace.write_config(job={"id": "llama", "nodes": 2, "rank": 1},
                           sync={"quiet_seconds": 60},
                           asg={"lifecycle_hook": hook, "heartbeat_interval": 1,
                                "save_grace": 0})
    daemon = workspace.start_daemon(AWS_ENDPOINT_URL_AUTO_SCALING=proxy.url)
    # Node 0 of the job is being scaled in: it publishes its Terminated notice.
    publish_as_peer(s3, workspace.bucket, "run1/", "llama", 0,
                    Notice.make(NoticeKind.ASG_TERMINATING, None, "Terminated"))
    assert daemon.wait_for_event("notice_detected")["source"] == "peer"
    daemon.wait_for_event("flush_done")
    # Later this instance is scaled in too, while its trainer still writes: only now is its
    # lifecycle action held (heart-beats), and it continues once, after its own flush.
    (workspace.checkpoints / "step_1").mkdir()
    with (workspace.checkpoints / "step_1" / "model.pt").open("wb") as checkpoint:
        checkpoint.write(b"weights" * 1000)
        checkpoint.flush()
        own_notice.set()
        imds.set_lifecycle_state("Terminated")
        wait_for(lambda: [call for call in proxy.named(HEARTBEAT) if call.note])
    completed = wait_for(lambda: proxy.named(COMPLETE))[0]
    assert completed.params["InstanceId"] == instance
    assert daemon.stop() == 0
    assert len(proxy.named(COMPLETE)) == 1
    assert all(call.note for call in proxy.calls)  # nothing before its own notice

def test_iam_policy_grants_the_lifecycle_calls_only_with_a_hook(workspace: Workspace) -> None:
    def actions() -> list[str]:
        policy = json.loads(workspace.cli("iam-policy", "-c", "config.yaml").stdout)
        found: list[str] = []
        for statement in policy["Statement"]:
            action = statement["Action"]
            found.extend([action] if isinstance(action, str) else action)
        return found

    assert not [a for a in actions() if a.startswith("autoscaling:")]
    workspace.write_config(asg={"lifecycle_hook": "drain", "group": "train"})
    granted = actions()
    assert "autoscaling:RecordLifecycleActionHeartbeat" in granted
    assert "autoscaling:CompleteLifecycleAction" in granted
    assert "autoscaling:DescribeLifecycleHooks" in granted  # the hook's heartbeat timeout
    assert "autoscaling:DescribeAutoScalingInstances" not in granted


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e5, max_value=1e5))
def test_heartbeat_interval_within_the_hooks_limits(value: float) -> None:
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "config.yaml"
        path.write_text(yaml.safe_dump({"watch": [{"path": root}],
                                        "asg": {"lifecycle_hook": "drain",
                                                "heartbeat_interval": value}}))
        try:
            config = load_config(path)
        except ConfigError as exc:
            assert not 1 <= value <= 7200
            assert "asg.heartbeat_interval" in str(exc)
        else:
            assert 1 <= value <= 7200 and config.asg.heartbeat_interval == value


def scale_in_before_the_checkpoint(workspace: Workspace, imds: ImdsEmulator, s3: Any,
                                   group: tuple[str, str, str], proxy: AutoScalingProxy,
                                   save_grace: float) -> Daemon:
    """A daemon told of its scale-in before the trainer saved its emergency checkpoint (to
    run1/emergency/model.pt): the notice's flush found nothing pending. Each lifecycle call
    notes whether that checkpoint was in S3 by then."""
    name, hook, instance = group
    imds.set_instance(instance, {GROUP_TAG: name})
    key = "run1/emergency/model.pt"
    proxy.on_call = lambda action: key in keys_in(s3, workspace.bucket)
    workspace.write_config(asg={"lifecycle_hook": hook, "heartbeat_interval": 1,
                                "save_grace": save_grace})
    daemon = workspace.start_daemon(AWS_ENDPOINT_URL_AUTO_SCALING=proxy.url)
    imds.set_lifecycle_state("Terminated")
    daemon.wait_for_event("flush_done")  # nothing was pending: done at once
    return daemon


def test_the_scale_in_waits_for_the_emergency_checkpoint_the_trainer_saves_after_the_notice(
        workspace: Workspace, imds: ImdsEmulator, s3: Any, group: tuple[str, str, str],
        proxy: AutoScalingProxy) -> None:
    """The flush the scale-in notice starts finds nothing pending: the trainer has only just
    been told. CONTINUE waits for asg.save_grace, and then for what the trainer saved in it."""
    daemon = scale_in_before_the_checkpoint(workspace, imds, s3, group, proxy, save_grace=8)
    beats = len(proxy.named(HEARTBEAT))
    wait_for(lambda: len(proxy.named(HEARTBEAT)) >= beats + 2)
    assert proxy.named(COMPLETE) == []  # held, though the flush found everything durable
    # The trainer, told by the notice, saves its emergency checkpoint.
    save_checkpoint(workspace.checkpoints / "emergency" / "model.pt", 100_000)
    completed = wait_for(lambda: proxy.named(COMPLETE), timeout=60)[0]
    assert completed.note is True  # the emergency checkpoint was in S3 by then
    assert daemon.stop() == 0
    assert len(proxy.named(COMPLETE)) == 1


def test_a_flush_the_trainer_asks_for_after_saving_ends_the_save_grace(
        workspace: Workspace, imds: ImdsEmulator, s3: Any, group: tuple[str, str, str],
        proxy: AutoScalingProxy) -> None:
    """`spotwatch flush` once the emergency checkpoint is saved says the trainer is done:
    the scale-in goes on once that flush made it durable, not after all of asg.save_grace."""
    daemon = scale_in_before_the_checkpoint(workspace, imds, s3, group, proxy,
                                            save_grace=3600)
    wait_for(lambda: proxy.named(HEARTBEAT))
    save_checkpoint(workspace.checkpoints / "emergency" / "model.pt", 100_000)
    done = workspace.cli("flush", "-c", "config.yaml")
    assert done.returncode == 0, done.stderr
    completed = wait_for(lambda: proxy.named(COMPLETE), timeout=60)[0]
    assert completed.note is True  # the emergency checkpoint was in S3 by then
    assert daemon.named("asg_save_grace_ended")
    assert daemon.stop() == 0
    assert len(proxy.named(COMPLETE)) == 1
