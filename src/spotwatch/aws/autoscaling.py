"""Auto Scaling lifecycle hooks: hold a scale-in until the flush made everything durable.

On a scale-in, AWS waits for the instance's lifecycle hook (heartbeat timeout 30-7200 s).
LifecycleAction heart-beats on its own thread (the daemon's loop never waits for AWS) and
sends CompleteLifecycleAction CONTINUE once. A failed call is a warning: the checkpoints stay
protected either way, the hook then simply times out.
"""

from __future__ import annotations

import threading
from typing import Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError

from spotwatch.aws.imds import ImdsClient, ImdsError
from spotwatch.aws.s3 import sdk_settings_checked
from spotwatch.config import AsgSettings, ImdsSettings
from spotwatch.logs import get_logger

log = get_logger("spotwatch.asg")

INSTANCE_ID_PATH = "meta-data/instance-id"
GROUP_TAG_PATH = "meta-data/tags/instance/aws:autoscaling:groupName"
# A reply botocore cannot parse (a proxy's plain-text or HTML page in Auto Scaling's place) is
# no BotoCoreError; S3's client retries one, Auto Scaling's raises it.
_AWS_ERRORS: tuple[type[Exception], ...] = (BotoCoreError, ClientError, ResponseParserError,
                                            ImdsError)
# What reading the hook's heartbeat timeout may raise besides: no such hook, a reply without it.
_HOOK_UNREADABLE: tuple[type[Exception], ...] = (*_AWS_ERRORS, LookupError, TypeError, ValueError)


def make_autoscaling_client(region: str) -> Any:
    """The endpoint follows AWS_ENDPOINT_URL(_AUTO_SCALING); few retries: a heartbeat repeats."""
    config = BotoConfig(region_name=region, retries={"mode": "standard", "max_attempts": 3},
                        connect_timeout=5, read_timeout=10)
    with sdk_settings_checked():
        return boto3.client("autoscaling", config=config)


class LifecycleAction:
    """The lifecycle action of this instance. Invariant: CompleteLifecycleAction is sent at
    most once, and only after complete() was called (the flush is over)."""

    def __init__(self, settings: AsgSettings, imds: ImdsSettings, client: Any) -> None:
        assert settings.lifecycle_hook is not None
        self.hook = settings.lifecycle_hook
        self._settings = settings
        self._imds = imds
        self._client = client
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._reason = ""

    @property
    def holding(self) -> bool:
        """Heart-beating: begun, and not yet completed."""
        return self._thread is not None and not self._done.is_set()

    def begin(self) -> None:
        """Start heart-beating (once; a second Terminated notice changes nothing)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="asg-lifecycle", daemon=True)
            self._thread.start()

    def complete(self, reason: str, wait: float = 0.0) -> None:
        """Stop heart-beating and let the scale-in continue; wait: seconds to wait for the call
        (the final flush waits, so that the process does not exit before it)."""
        if self._thread is None or self._done.is_set():  # not holding (mypy needs it spelt out)
            return
        self._reason = reason
        self._done.set()
        if wait:
            self._thread.join(wait)

    def _run(self) -> None:
        target = self._target()
        if target is None:
            return
        interval = self._heartbeat_interval(target)
        while not self._done.is_set():
            self._call("RecordLifecycleActionHeartbeat", target)
            self._done.wait(interval)
        self._call("CompleteLifecycleAction", {**target, "LifecycleActionResult": "CONTINUE"})

    def _target(self) -> dict[str, str] | None:
        try:
            imds = ImdsClient.from_settings(self._imds)
            instance_id = (imds.get(INSTANCE_ID_PATH) or "").strip()
            if not instance_id:
                raise ImdsError("IMDS has no instance-id")
            group = self._settings.group or self._group_of(imds, instance_id)
        except _AWS_ERRORS as exc:
            log.warning("asg_lifecycle_unavailable", hook=self.hook, error=str(exc),
                        detail="the scale-in waits for the hook's heartbeat timeout instead")
            return None
        return {"LifecycleHookName": self.hook, "AutoScalingGroupName": group,
                "InstanceId": instance_id}

    def _heartbeat_interval(self, target: dict[str, str]) -> float:
        """Invariant: heartbeats come more often than the hook's HeartbeatTimeout, or the
        scale-in would go on (with the hook's default result) before the flush is done. The
        timeout is read from the hook; a configured interval not below it is replaced by half
        of it, with one warning. Unreadable, the configured interval stands."""
        configured = self._settings.heartbeat_interval
        try:
            found = self._client.describe_lifecycle_hooks(
                AutoScalingGroupName=target["AutoScalingGroupName"],
                LifecycleHookNames=[self.hook])
            if not found["LifecycleHooks"]:  # AWS answers a wrong name with no hooks
                raise LookupError(f"the group {target['AutoScalingGroupName']} has no "
                                  f"lifecycle hook named {self.hook!r} (asg.lifecycle_hook)")
            timeout = float(found["LifecycleHooks"][0]["HeartbeatTimeout"])
        except _HOOK_UNREADABLE as exc:
            log.warning("asg_heartbeat_timeout_unknown", hook=self.hook, error=str(exc),
                        heartbeat_interval=configured)
            return configured
        if configured < timeout:
            return configured
        log.warning("asg_heartbeat_interval_too_long", hook=self.hook,
                    heartbeat_interval=configured, heartbeat_timeout=timeout,
                    using=timeout / 2, detail="asg.heartbeat_interval must be below the "
                    "hook's HeartbeatTimeout")
        return timeout / 2

    def _group_of(self, imds: ImdsClient, instance_id: str) -> str:
        """The instance's aws:autoscaling:groupName tag (when instance tags are in IMDS), else
        what DescribeAutoScalingInstances says."""
        tag = (imds.get(GROUP_TAG_PATH) or "").strip()
        if tag:
            return tag
        found = self._client.describe_auto_scaling_instances(InstanceIds=[instance_id])
        instances = found.get("AutoScalingInstances", [])
        if not instances:
            raise ImdsError(f"instance {instance_id} is in no Auto Scaling group")
        return str(instances[0]["AutoScalingGroupName"])

    def _call(self, operation: str, params: dict[str, str]) -> None:
        method = getattr(self._client, _snake(operation))
        try:
            method(**params)
        except _AWS_ERRORS as exc:
            log.warning("asg_lifecycle_call_failed", operation=operation, hook=self.hook,
                        error=str(exc))
            return
        if operation == "CompleteLifecycleAction":
            log.info("asg_lifecycle_completed", hook=self.hook, result="CONTINUE",
                     reason=self._reason, group=params["AutoScalingGroupName"])
        else:
            log.debug("asg_lifecycle_heartbeat", hook=self.hook)


def _snake(operation: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in operation).lstrip("_")
