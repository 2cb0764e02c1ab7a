"""What every start of a flush costs before its first upload, and what stays with it: the
S3 model parsed once, and start-up's objects kept out of the cyclic garbage collector."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import botocore.parsers
import botocore.session
import pytest
from botocore.utils import parse_timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

import spotwatch.aws.s3
from spotwatch.aws.crt_store import CrtClient, CrtObjectStore
from spotwatch.aws.s3 import DataFileLoader, make_s3_client, parse_s3_timestamp
from spotwatch.collector import uncollected_start_up
from spotwatch.config import TransferSettings, load_config
from spotwatch.daemon.loop import Daemon

from .conftest import REGION, Workspace, keys_in
from .faultproxy import FaultProxy
from .test_daemon_e2e import save_checkpoint

# A credential_process that hands out a new key id on every call (KEY1, KEY2 ...): the first
# expires in 12 minutes, inside botocore's refresh window, so its next use rotates it; later
# ones last two hours.
ROTATING_CREDENTIALS = """
import datetime, json, pathlib, sys
calls = pathlib.Path(sys.argv[1])
n = len(calls.read_text()) + 1 if calls.exists() else 1
calls.write_text("x" * n)
lasts = datetime.timedelta(minutes=12 if n == 1 else 120)
expires = datetime.datetime.now(datetime.timezone.utc) + lasts
print(json.dumps({"Version": 1, "AccessKeyId": f"KEY{n}", "SecretAccessKey": "secret",
                  "SessionToken": "token", "Expiration": expires.isoformat()}))
"""


def test_the_s3_model_is_parsed_once_per_process(monkeypatch: pytest.MonkeyPatch,
                                                 bucket: str) -> None:
    """The S3 client and the CRT store's serializer share botocore's loaded models: parsing
    the S3 model (megabytes of JSON) cost each session about 0.05 CPU-seconds."""
    parsed: list[str] = []
    original = DataFileLoader.load_file

    def counted(self: DataFileLoader, file_path: str) -> Any:
        data = original(self, file_path)
        # A data path without the file (the AWS CLI adds its own to AWS_DATA_PATH) is looked
        # at, not parsed.
        if data is not None and Path(file_path).name == "service-2" and "/s3/" in file_path:
            parsed.append(file_path)
        return data

    monkeypatch.setattr(DataFileLoader, "load_file", counted)
    spotwatch.aws.s3._data_loader.cache_clear()  # a new loader: the model not parsed yet
    transfer = TransferSettings(client="crt")
    for _ in range(2):
        store = CrtObjectStore(make_s3_client(REGION, transfer), bucket, transfer)
        store.crt()  # its serializer's client too
        store.close()
    assert len(parsed) == 1


def test_a_crt_store_makes_one_botocore_session(monkeypatch: pytest.MonkeyPatch,
                                               bucket: str) -> None:
    """The S3 client, the CRT's request serializer and the CRT's credentials share one session:
    each session registers some five hundred event handlers (about 0.01 CPU-seconds)."""
    made: list[botocore.session.Session] = []
    original = botocore.session.Session.__init__

    def counted(self: botocore.session.Session, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(botocore.session.Session, "__init__", counted)
    transfer = TransferSettings(client="crt")
    store = CrtObjectStore(make_s3_client(REGION, transfer), bucket, transfer)
    store.crt()
    store.close()
    assert len(made) == 1


def test_a_crt_store_makes_the_crts_client_for_its_first_crt_transfer(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, s3: Any, bucket: str) -> None:
    """Listing and ranged GETs go through the boto3 client alone: the CRT's client and its
    request serializer (3 ms of each start) are made only once a transfer needs them."""
    s3.put_object(Bucket=bucket, Key="big", Body=b"b" * 1_000)
    (tmp_path / "small").write_bytes(b"s" * 10)
    transfer = TransferSettings(client="crt", multipart_threshold=1_000)  # "big": ranged GETs
    store = CrtObjectStore(make_s3_client(REGION, transfer), bucket, transfer)
    made = crt_clients_made(monkeypatch, store)
    try:
        assert [item.key for item in store.list_objects("")] == ["big"]
        store.download("big", tmp_path / "big", 1_000)
        assert (tmp_path / "big").read_bytes() == b"b" * 1_000
        assert made == []
        store.upload_file(tmp_path / "small", "small", 10).future.result(timeout=60)
        store.upload_file(tmp_path / "small", "again", 10).future.result(timeout=60)
        assert len(made) == 1
    finally:
        store.close()


def test_threads_starting_crt_transfers_at_once_share_one_crt_client(
        monkeypatch: pytest.MonkeyPatch, bucket: str) -> None:
    transfer = TransferSettings(client="crt")
    store = CrtObjectStore(make_s3_client(REGION, transfer), bucket, transfer)
    made = crt_clients_made(monkeypatch, store)
    threads = 8
    together = threading.Barrier(threads)

    def first_use(_: int) -> CrtClient:
        together.wait(timeout=30)
        return store.crt()

    try:
        with ThreadPoolExecutor(threads) as pool:
            used = list(pool.map(first_use, range(threads)))
    finally:
        store.close()
    assert len(made) == 1
    assert all(crt is made[0] for crt in used)


def crt_clients_made(monkeypatch: pytest.MonkeyPatch, store: CrtObjectStore) -> list[CrtClient]:
    """Every CrtClient made from now on; each must be made while the store's lock is held."""
    made: list[CrtClient] = []
    original = CrtClient.__init__

    def counted(self: CrtClient, client: Any, bucket: str, settings: TransferSettings) -> None:
        assert store._crt_lock.locked()
        made.append(self)
        original(self, client, bucket, settings)

    monkeypatch.setattr(CrtClient, "__init__", counted)
    return made


def test_the_crt_signs_with_the_clients_credentials_as_they_rotate(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bucket: str) -> None:
    """Credentials are resolved once per store, and the CRT signs with the client's own: after
    they are refreshed, both sign with the new ones (never two chains each refreshing apart)."""
    calls = tmp_path / "calls"
    (tmp_path / "creds.py").write_text(ROTATING_CREDENTIALS)
    (tmp_path / "aws-config").write_text(
        f"[profile rotating]\ncredential_process = {sys.executable} {tmp_path / 'creds.py'} "
        f"{calls}\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_PROFILE", "rotating")
    (tmp_path / "a.pt").write_bytes(b"a" * 1_000)
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        transfer = TransferSettings(client="crt")
        store = CrtObjectStore(make_s3_client(REGION, transfer), bucket, transfer)
        try:
            store.upload_file(tmp_path / "a.pt", "a.pt", 1_000).future.result(timeout=60)
            assert [item.key for item in store.list_objects("")] == ["a.pt"]
            store.upload_file(tmp_path / "a.pt", "b.pt", 1_000).future.result(timeout=60)
        finally:
            store.close()
    assert {request.access_key for request, _ in proxy.seen} == {"KEY2"}
    assert calls.read_text() == "xx"  # resolved once, refreshed once


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


def test_the_cli_imports_a_command_without_the_cycle_collector() -> None:
    """The collector's passes while `restore` was imported (some 130, one of them full) cost
    every start 24 ms; what the import made is exempted from it, and it runs again for the
    command itself."""
    probe = ("import gc; import spotwatch.cli as cli; "
             "passes = lambda: sum(g['collections'] for g in gc.get_stats()); before = passes(); "
             "cli._command('restore'); "
             "print(passes() - before, gc.isenabled(), gc.get_freeze_count() > 0)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split() == ["0", "True", "True"], done.stderr


def test_a_collector_turned_off_stays_off() -> None:
    gc.disable()
    try:
        with uncollected_start_up():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()


def test_flush_never_imports_requests_nor_dotenv(workspace: Workspace, s3: Any) -> None:
    """requests serves IMDS only, which a flush does not ask: importing it (and its charset
    detection) cost every flush a thirtieth of a second of CPU. dotenv reads config/.env only
    when no bucket is named otherwise (here $S3_BUCKET_NAME names it): 5 ms more."""
    save_checkpoint(workspace.checkpoints / "step_1" / "a.pt", 1_000)
    probe = ("import sys; from spotwatch.cli import main; code = main(['flush', '-c', "
             "'config.yaml']); print(code, *sorted({m.split('.')[0] for m in sys.modules} & "
             "{'requests', 'charset_normalizer', 'dotenv'}))")
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
    utc = moment.astimezone(UTC)
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
    assert [item["LastModified"].tzinfo for item in listed] == [UTC] * 2
    assert all(abs(item["LastModified"] - datetime.now(UTC)) < timedelta(hours=1)
               for item in listed)


def refused(value: object) -> datetime:
    raise AssertionError(f"botocore's timestamp parser was asked for {value!r}")
