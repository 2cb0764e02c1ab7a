"""spotwatch's botocore data loader: the same models as botocore's own loader, found and
decoded faster (see aws.s3.DataLoader); every other service still loads, an unknown one is
still refused."""

from __future__ import annotations

import gzip
import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import botocore.loaders
import botocore.session
import pytest
from botocore.exceptions import DataNotFoundError, UnknownServiceError
from hypothesis import given, settings
from hypothesis import strategies as st

import spotwatch.aws.s3
from spotwatch.aws.s3 import (
    DATA_FILE_OPENERS,
    DataFileLoader,
    DataLoader,
    botocore_session,
    decode_data_file,
)
from spotwatch.config import TransferSettings

from .conftest import REGION

MODELS = [(service, type_name) for service in ("s3", "sts")
          for type_name in ("service-2", "endpoint-rule-set-1")]
DATA_FILES = ["endpoints", "partitions", "sdk-default-configuration", "_retry"]


def same_json(ours: Any, botocores: Any) -> None:
    """Equal values, and the same JSON text: every mapping's keys in the same order."""
    assert ours == botocores
    assert json.dumps(ours) == json.dumps(botocores)


def refused_walk(self: botocore.loaders.Loader, type_name: str) -> list[str]:
    raise AssertionError(f"every service was listed for {type_name}")


def refused_json(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a data file went to the standard library's JSON decoder")


@pytest.mark.parametrize(("service", "type_name"), MODELS)
def test_models_equal_botocores(service: str, type_name: str) -> None:
    same_json(DataLoader().load_service_model(service, type_name),
              botocore.loaders.create_loader().load_service_model(service, type_name))


@pytest.mark.parametrize("name", DATA_FILES)
def test_data_files_equal_botocores(name: str) -> None:
    same_json(DataLoader().load_data(name), botocore.loaders.create_loader().load_data(name))


def test_models_load_without_listing_services_nor_stdlib_json(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path is the one taken: if botocore's Loader or file loader changes so that it
    is not, this fails rather than the saving going silently."""
    loader = DataLoader()
    monkeypatch.setattr(botocore.loaders.Loader, "list_available_services", refused_walk)
    monkeypatch.setattr(botocore.loaders, "json", SimpleNamespace(loads=refused_json))
    monkeypatch.setattr(spotwatch.aws.s3, "json", SimpleNamespace(loads=refused_json))
    for service, type_name in MODELS:
        assert loader.load_service_model(service, type_name)
    for name in DATA_FILES:
        assert loader.load_data(name)


def test_the_s3_client_is_made_on_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """make_s3_client's loader is DataLoader (a fresh one here, so that it loads)."""
    spotwatch.aws.s3._data_loader.cache_clear()
    monkeypatch.setattr(botocore.loaders.Loader, "list_available_services", refused_walk)
    monkeypatch.setattr(botocore.loaders, "json", SimpleNamespace(loads=refused_json))
    client = spotwatch.aws.s3.make_s3_client(REGION, TransferSettings())
    assert client.meta.service_model.service_name == "s3"
    assert isinstance(botocore_session().get_component("data_loader"), DataLoader)


@pytest.mark.parametrize("service", ["sts", "sso", "sso-oidc"])
def test_clients_of_the_credential_services_are_made(service: str) -> None:
    """Those botocore makes for assume-role and SSO profiles, from the shared session."""
    client = botocore_session().create_client(service, region_name=REGION)
    stock = botocore.session.Session().create_client(service, region_name=REGION)
    assert client.meta.service_model.operation_names == stock.meta.service_model.operation_names
    assert client.meta.endpoint_url == stock.meta.endpoint_url


def test_the_openers_are_botocores() -> None:
    """The file names tried, in botocore's order: a new form of data file fails here first."""
    ours = [extension for extension, _ in DATA_FILE_OPENERS]
    assert ours == list(botocore.loaders._JSON_OPEN_METHODS)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("service", "type_name"), [
    ("no-such-service", "service-2"), ("s3/../sts", "service-2"), ("", "service-2"),
    ("../data/s3", "service-2"), ("S3", "service-2"), ("sts", "resources-1"),
    ("s3", "no-such-type-1")])
def test_an_unknown_service_is_refused_as_botocore_refuses_it(service: str,
                                                              type_name: str) -> None:
    with pytest.raises(UnknownServiceError) as botocores:
        botocore.loaders.create_loader().load_service_model(service, type_name)
    with pytest.raises(UnknownServiceError) as ours:
        DataLoader().load_service_model(service, type_name)
    assert str(ours.value) == str(botocores.value)


def test_a_data_path_loads_as_botocores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS_DATA_PATH: its directories come first, in botocore's order; a service found there
    (plain or gzipped, with an SDK extras file), an API version named, and one missing."""
    sts = botocore.loaders.create_loader().load_service_model("sts", "service-2")
    for version, opener, suffix in (("2020-01-01", open, ".json"),
                                    ("2021-01-01", gzip.open, ".json.gz")):
        folder = tmp_path / "models" / "mysvc" / version
        folder.mkdir(parents=True)
        with opener(folder / f"service-2{suffix}", "wt") as file:
            json.dump({**sts, "metadata": {**sts["metadata"], "apiVersion": version}}, file)
    extras = {"merge": {"metadata": {"serviceId": "My Service"}}}
    (tmp_path / "models" / "mysvc" / "2021-01-01" / "service-2.sdk-extras.json").write_text(
        json.dumps(extras))
    monkeypatch.setenv("EXTRA", str(tmp_path / "models"))
    data_path = os.pathsep.join(["$EXTRA", str(tmp_path / "missing"), "~/nowhere"])
    ours = spotwatch.aws.s3._data_loader(data_path)
    botocores = botocore.loaders.create_loader(data_path)
    assert ours.search_paths == botocores.search_paths
    assert ours.search_paths[0] == str(tmp_path / "models")
    for api_version in (None, "2020-01-01"):
        same_json(ours.load_service_model("mysvc", "service-2", api_version),
                  botocores.load_service_model("mysvc", "service-2", api_version))
    assert ours.load_service_model("mysvc", "service-2")["metadata"]["serviceId"] == \
        "My Service"
    same_json(ours.load_service_model("s3", "service-2"),
              botocores.load_service_model("s3", "service-2"))
    with pytest.raises(DataNotFoundError):
        ours.load_service_model("mysvc", "service-2", "1999-01-01")


def test_what_msgspec_refuses_is_decoded_as_botocore_decodes_it(tmp_path: Path) -> None:
    (tmp_path / "odd.json").write_text('{"b": "\\ud800", "c": 1e400, "d": NaN, "e": null}')
    ours = DataFileLoader().load_file(str(tmp_path / "odd"))
    botocores = botocore.loaders.JSONFileLoader().load_file(str(tmp_path / "odd"))
    assert list(ours) == list(botocores) == ["b", "c", "d", "e"]
    assert ours["b"] == botocores["b"] == "\ud800"
    assert ours["c"] == botocores["c"] == math.inf
    assert math.isnan(ours["d"]) and ours["e"] is None


def test_a_file_of_null_is_passed_over_as_botocore_passes_it_over(tmp_path: Path) -> None:
    """botocore tries the next form of the file when one decodes to nothing."""
    (tmp_path / "x.json").write_text("null")
    with gzip.open(tmp_path / "x.json.gz", "wt") as file:
        file.write('{"found": "gzipped"}')
    same_json(DataFileLoader().load_file(str(tmp_path / "x")),
              botocore.loaders.JSONFileLoader().load_file(str(tmp_path / "x")))
    assert DataFileLoader().load_file(str(tmp_path / "absent")) is None


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30)


@settings(max_examples=300)
@given(value=JSON_VALUES, ascii_only=st.booleans(), indent=st.sampled_from([None, 1]))
def test_decoding_agrees_with_botocores(value: Any, ascii_only: bool,
                                        indent: int | None) -> None:
    payload = json.dumps(value, ensure_ascii=ascii_only, indent=indent).encode()
    same_json(decode_data_file(payload),
              json.loads(payload.decode("utf-8"), object_pairs_hook=OrderedDict))
