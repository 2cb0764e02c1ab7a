"""What every start of a flush costs before its first upload, and what stays with it: the
S3 model parsed once, and start-up's objects kept out of the cyclic garbage collector."""

from __future__ import annotations

import gc
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import botocore.loaders
import botocore.parsers
import pytest
from botocore.utils import parse_timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

import spotwatch.aws.s3
from spotwatch.aws.crt_store import CrtObjectStore
from spotwatch.aws.s3 import make_s3_client, parse_s3_timestamp
from spotwatch.config import TransferSettings, load_config
from spotwatch.daemon.loop import Daemon

from .conftest import REGION, Workspace, keys_in
from .test_daemon_e2e import save_checkpoint


def test_the_s3_model_is_parsed_once_per_process(monkeypatch: pytest.MonkeyPatch,
                                                 bucket: str) -> None:
    """The S3 client and the CRT store's serializer share botocore's loaded models: parsing
    the S3 model (megabytes of JSON) cost each session about 0.05 CPU-seconds."""
    parsed: list[str] = []
    original = botocore.loaders.JSONFileLoader.load_file

    def counted(self: botocore.loaders.JSONFileLoader, file_path: str) -> Any:
        if Path(file_path).name == "service-2" and "/s3/" in file_path:
            parsed.append(file_path)
        return original(self, file_path)

    monkeypatch.setattr(botocore.loaders.JSONFileLoader, "load_file", counted)
    transfer = TransferSettings(client="crt")
    for _ in range(2):
        CrtObjectStore(make_s3_client(REGION, transfer), bucket, transfer).close()
    assert len(parsed) <= 1


def test_flush_keeps_start_up_objects_out_of_the_cycle_collector(workspace: Workspace,
                                                                  s3: Any) -> None:
    """The S3 client's model (made before the flush) is no longer traversed by the cyclic
    collector once the flush has started: its full collections walked it for every few
    thousand allocations."""
    for index in range(3):
        save_checkpoint(workspace.checkpoints / "step_1" / f"{index}.pt", 1_000)
    config = load_config(workspace.config_file)
    client = make_s3_client(config.region, config.transfer)
    model = client.meta.service_model
    try:
        assert Daemon(config, workspace.bucket, client).flush_once().exit_code == 0
        assert not any(tracked is model for tracked in gc.get_objects())
    finally:
        gc.unfreeze()
    assert {f"run1/step_1/{index}.pt" for index in range(3)} <= keys_in(s3, workspace.bucket)


def test_flush_never_imports_requests(workspace: Workspace, s3: Any) -> None:
    """requests serves IMDS only, which a flush does not ask: importing it (and its charset
    detection) cost every flush a thirtieth of a second of CPU."""
    save_checkpoint(workspace.checkpoints / "step_1" / "a.pt", 1_000)
    probe = ("import sys; from spotwatch.cli import main; code = main(['flush', '-c', "
             "'config.yaml']); print(code, *sorted({m.split('.')[0] for m in sys.modules} & "
             "{'requests', 'charset_normalizer'}))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=workspace.root,
                          env=workspace.env(), capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["0"], done.stderr
    assert "run1/step_1/a.pt" in keys_in(s3, workspace.bucket)


@settings(max_examples=300)
@given(moment=st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9999, 12, 30),
                           timezones=st.timezones()),
       style=st.sampled_from(["Z", "offset", "http", "naive"]))
def test_timestamps_parse_as_botocore_parses_them(moment: datetime, style: str) -> None:
    """Whatever form a timestamp comes in, the fast parser agrees with botocore's."""
    utc = moment.astimezone(timezone.utc)
    text = {"Z": utc.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
            "offset": moment.isoformat(),
            "http": utc.strftime("%a, %d %b %Y %H:%M:%S GMT"),
            "naive": moment.replace(tzinfo=None).isoformat()}[style]
    assert parse_s3_timestamp(text) == parse_timestamp(text)


def test_a_listing_parses_its_timestamps_without_botocores_parser(
        monkeypatch: pytest.MonkeyPatch, s3: Any, bucket: str) -> None:
    """botocore's general parser cost a listing of 100,000 objects seconds of CPU."""
    for name in ("a", "b"):
        s3.put_object(Bucket=bucket, Key=name, Body=b"x")
    client = make_s3_client(REGION, TransferSettings())
    # botocore's parsers take their default when they are made: with the client, below.
    monkeypatch.setattr(botocore.parsers, "DEFAULT_TIMESTAMP_PARSER", refused)
    monkeypatch.setattr(spotwatch.aws.s3, "parse_timestamp", refused)
    client = make_s3_client(REGION, TransferSettings())
    listed = client.list_objects_v2(Bucket=bucket)["Contents"]
    assert [item["LastModified"].tzinfo for item in listed] == [timezone.utc] * 2
    assert all(abs(item["LastModified"] - datetime.now(timezone.utc)) < timedelta(hours=1)
               for item in listed)


def refused(value: object) -> datetime:
    raise AssertionError(f"botocore's timestamp parser was asked for {value!r}")
