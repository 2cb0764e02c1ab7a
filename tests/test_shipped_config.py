"""The config.yaml shipped at the top of the repository is valid and documents the defaults."""

from __future__ import annotations

from pathlib import Path

from spotwatch.config import Config, TransferSettings, WatchDir, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_loads_with_contract_values() -> None:
    config = load_config(ROOT / "config.yaml")
    assert config.region == "us-west-2"
    assert config.watch[0].path == Path("/opt/ml/checkpoints")
    # The filters it spells out are the defaults: a copy of it loses none of them.
    assert config.watch[0].exclude == WatchDir(Path("/opt/ml/checkpoints")).exclude
    assert config.transfer == TransferSettings()
    assert config.sync.mode == "continuous"
    assert config.imds.poll_interval == 1.0
    assert isinstance(config, Config)
