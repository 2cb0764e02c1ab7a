"""Bucket name resolution: --bucket, then $S3_BUCKET_NAME, then config/.env."""

from __future__ import annotations

from pathlib import Path

import pytest

from spotwatch.bucket import resolve_bucket
from spotwatch.errors import ConfigError


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / ".env").write_text(
        "# bucket for checkpoints\nS3_BUCKET_NAME=from-env-file\n"
    )
    path = tmp_path / "config.yaml"
    path.write_text("watch: [{path: x}]\n")
    return path


def test_explicit_wins(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S3_BUCKET_NAME", "from-environment")
    assert resolve_bucket("from-flag", config_file) == "from-flag"


def test_environment_beats_env_file(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S3_BUCKET_NAME", "from-environment")
    assert resolve_bucket(None, config_file) == "from-environment"


def test_env_file_beside_config(config_file: Path, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert resolve_bucket(None, config_file) == "from-env-file"


def test_env_file_in_working_directory(config_file: Path, tmp_path: Path) -> None:
    assert resolve_bucket(None, None) == "from-env-file"


def test_missing_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no bucket"):
        resolve_bucket(None, None)


@pytest.mark.parametrize("name", ["ab", "UPPER", "under_score", "a..b", "-start", "x" * 64])
def test_invalid_names(name: str) -> None:
    with pytest.raises(ConfigError, match="not a valid S3 bucket name"):
        resolve_bucket(name, None)
