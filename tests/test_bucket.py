"""Bucket name resolution: --bucket, then $S3_BUCKET_NAME, then config/.env."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spotwatch.bucket import (
    RESERVED_PREFIXES,
    RESERVED_SUFFIXES,
    NamedBucket,
    is_valid_bucket_name,
    named_bucket,
)
from spotwatch.errors import ConfigError


def resolve_bucket(explicit: str | None, config_file: Path | None) -> str:
    return named_bucket(explicit, config_file).name


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


@pytest.mark.parametrize("blank", ["", " ", "\t ", "\n"])
def test_a_blank_environment_variable_falls_back_to_the_env_file(
        config_file: Path, monkeypatch: pytest.MonkeyPatch, blank: str) -> None:
    monkeypatch.setenv("S3_BUCKET_NAME", blank)
    assert resolve_bucket(None, config_file) == "from-env-file"


def test_each_source_is_named(config_file: Path, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the bucket was named, for a refusal to say: a config/.env names one silently."""
    monkeypatch.setenv("S3_BUCKET_NAME", "from-environment")
    assert named_bucket(" from-flag ", config_file) == NamedBucket("from-flag", "--bucket")
    assert named_bucket(None, config_file) == NamedBucket("from-environment", "$S3_BUCKET_NAME")
    monkeypatch.setenv("S3_BUCKET_NAME", "")
    beside = tmp_path / "config" / ".env"
    assert named_bucket(None, config_file) == NamedBucket("from-env-file", str(beside))
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "config").mkdir(parents=True)
    (elsewhere / "config" / ".env").write_text("S3_BUCKET_NAME=Not_Valid\n")
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ConfigError, match=rf"'Not_Valid' \(from {elsewhere}/config/.env\)"):
        named_bucket(None, None)


def test_missing_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no bucket"):
        resolve_bucket(None, None)


@pytest.mark.parametrize("name", ["ab", "UPPER", "under_score", "a..b", "-start", "x" * 64])
def test_invalid_names(name: str) -> None:
    with pytest.raises(ConfigError, match="not a valid S3 bucket name"):
        resolve_bucket(name, None)


@pytest.mark.parametrize("name", [
    "192.168.5.4", "10.0.0.1",  # IP-address form
    "xn--bucket", "sthree-bucket", "sthree-configurator", "amzn-s3-demo-bucket",
    "bucket-s3alias", "bucket--ol-s3", "bucket.mrap", "bucket--x-s3", "bucket--table-s3",
    "a.b--usw2-az1--x-s3",  # a directory bucket name has no dots
    "ckpt.", "ckpt-", ".ckpt",
])
def test_s3_rules(name: str) -> None:
    with pytest.raises(ConfigError, match="not a valid S3 bucket name"):
        resolve_bucket(name, None)
    assert not is_valid_bucket_name(name + "\n")  # a regex '$' would let this through


@pytest.mark.parametrize("name", ["ckpt--usw2-az1--x-s3", "team-a--use1-az4--x-s3",
                                  "ckpt--usw2-lax1-az1--x-s3", "my.bucket.1", "1.2.3.4a",
                                  "abc", "a" * 63, "x-s3"])
def test_valid_names(name: str) -> None:
    assert resolve_bucket(name, None) == name


@given(st.from_regex(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", fullmatch=True))
def test_names_follow_every_rule(name: str) -> None:
    """Any name accepted obeys each rule; any refused breaks at least one."""
    breaks = (".." in name or re.fullmatch(r"\d+\.\d+\.\d+\.\d+", name) is not None
              or name.startswith(RESERVED_PREFIXES)
              or (name.endswith(RESERVED_SUFFIXES)
                  and re.fullmatch(r"[a-z0-9-]+--[a-z0-9-]+-az\d+--x-s3", name) is None))
    assert is_valid_bucket_name(name) is not breaks


def test_empty_flag_is_an_error_not_a_fallback(config_file: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S3_BUCKET_NAME", "from-environment")
    for empty in ("", "  "):
        with pytest.raises(ConfigError, match="--bucket is empty"):
            resolve_bucket(empty, config_file)


def test_env_file_that_is_not_utf8(config_file: Path, tmp_path: Path) -> None:
    (tmp_path / "config" / ".env").write_bytes(b"S3_BUCKET_NAME=caf\xe9-bucket\n")
    with pytest.raises(ConfigError, match=r"config/\.env: not UTF-8 text \(byte 18\)"):
        resolve_bucket(None, config_file)


@pytest.mark.parametrize("line", ["S3_BUCKET_NAME='unterminated", "S3_BUCKET_NAME: colon-bucket",
                                  'S3_BUCKET_NAME="quoted" trailing'])
def test_a_bucket_line_the_env_file_cannot_parse_is_named_with_its_line(
        config_file: Path, tmp_path: Path, line: str, capfd: pytest.CaptureFixture[str]) -> None:
    """Not a `no bucket` that says to put the name in the file it is in, after dotenv's own
    warning naming no file: one error naming the file and the line."""
    (tmp_path / "config" / ".env").write_text(f"# bucket\n{line}\n")
    with pytest.raises(ConfigError) as refused:
        resolve_bucket(None, config_file)
    assert str(refused.value) == (f"{tmp_path / 'config' / '.env'}, line 2: cannot read "
                                  f"{line!r} as S3_BUCKET_NAME=name")
    assert capfd.readouterr().err == ""


def test_lines_of_other_tools_the_env_file_holds_are_none_of_its_business(
        config_file: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config" / ".env").write_text("OTHER: value\nS3_BUCKET_NAME=the-bucket\n")
    assert resolve_bucket(None, config_file) == "the-bucket"
    assert capfd.readouterr().err == ""


def test_the_env_file_is_beside_the_config_as_named_through_a_link(
        config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`-c lnk/config.yaml`, a link to the real file elsewhere: config/.env is looked for
    beside the link, where the config's relative paths are taken from too."""
    (tmp_path / "lnk" / "config").mkdir(parents=True)
    (tmp_path / "lnk" / "config" / ".env").write_text("S3_BUCKET_NAME=beside-the-link\n")
    (tmp_path / "lnk" / "config.yaml").symlink_to(config_file)
    monkeypatch.chdir(tmp_path / "lnk" / "config")  # not the working directory's either
    assert resolve_bucket(None, tmp_path / "lnk" / "config.yaml") == "beside-the-link"
