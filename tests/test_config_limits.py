"""Every impossible config value is one ConfigError at load (exit 2, one line), never a
traceback; overlapping watch entries are refused; loading a hostile file stays bounded."""

from __future__ import annotations

import math
import os
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spotwatch.config import Config, config_keys, load_config
from spotwatch.errors import ConfigError
from spotwatch.keys import manifest_key, object_key

from .conftest import Workspace
from .test_config import assert_usage_error

FLOAT_KEYS = ["sync.settle_seconds", "sync.quiet_seconds", "sync.stop_timeout",
              "imds.poll_interval", "imds.timeout"]


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "config.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def with_key(dotted: str, value: Any) -> str:
    section, key = dotted.split(".")
    return yaml.safe_dump({"watch": [{"path": "x"}], section: {key: value}})


def refused(tmp_path: Path, text: str | bytes) -> str:
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, text))
    message = str(raised.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused(tmp_path: Path, key: str, value: float) -> None:
    assert "must be a finite number" in refused(tmp_path, with_key(key, value))


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [10**400, 1e300, 86401, 0, -1])
def test_durations_are_positive_and_at_most_a_day(tmp_path: Path, key: str, value: Any) -> None:
    # "more than 0 and at most 86400 seconds", or "from 0.1 to 86400 seconds" with a floor
    assert "86400 seconds" in refused(tmp_path, with_key(key, value))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("transfer.multipart_chunksize", "6GB", "from 5 MiB to 5 GiB"),
        ("transfer.multipart_chunksize", 5 * 2**20 - 1, "from 5 MiB to 5 GiB"),
        ("transfer.multipart_chunksize", 10**30, "from 5 MiB to 5 GiB"),
        ("transfer.multipart_threshold", "6GiB", "from 1 bytes to 5 GiB"),
        ("transfer.multipart_threshold", "9" * 5000, "not a size"),
        ("transfer.multipart_threshold", True, "must be integer or string, got bool"),
        ("transfer.max_concurrency", 10**100, "from 1 to 256"),
        ("imds.token_ttl", False, "must be integer, got bool"),
        ("imds.endpoint", "https://169.254.169.254", "must be an http URL"),
        ("imds.endpoint", "169.254.169.254", "must be an http URL"),
        ("imds.endpoint", "http://", "must be an http URL"),
        ("imds.endpoint", "http://host:99999", "must be an http URL"),
        ("imds.endpoint", "http://[::1", "must be an http URL"),
        ("imds.endpoint", "http://host/latest/meta-data", "must be an http URL"),
        ("imds.endpoint", "ftp://host", "must be an http URL"),
        ("imds.endpoint", "", "must not be empty"),
        ("aws.region", "", "must not be empty"),
        ("aws.region", "us-west-2\n", "control character"),
        ("metrics.address", "", "must not be empty"),
        ("hooks.command", "", "must not be empty"),
        ("hooks.command", "echo \x1b[31m", "control character"),
        ("hooks.notice_file", "a\x00b", "control character"),
        ("state.dir", "", "must not be empty"),
        ("transfer.sse_kms_key_id", "", "must not be empty"),
        ("log.level", "\ud800", "not valid Unicode"),
    ],
)
def test_impossible_values_are_refused(tmp_path: Path, key: str, value: Any,
                                       message: str) -> None:
    assert message in refused(tmp_path, with_key(key, value))


def test_multiline_hook_command_is_accepted(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, with_key("hooks.command", "sync\n\techo done\n")))
    assert config.hooks.command == "sync\n\techo done\n"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"path": ""}, "'watch[0].path' must not be empty"),
        ({"path": "x", "prefix": "a\tb/"}, "control character"),
        ({"path": "x", "prefix": "run\n1/"}, "control character"),
        ({"path": "x", "prefix": "é" * 512}, "no room for a key"),
        ({"path": "x", "prefix": "p" * 1023}, "no room for a key"),
        ({"path": "x", "exclude": [""]}, "'watch[0].exclude' must not be empty"),
        ({"path": "x", "include": ["a\x07"]}, "control character"),
        ({"path": "~no-such-user-anywhere/x"}, "not a usable path"),
    ],
)
def test_impossible_watch_entries_are_refused(tmp_path: Path, entry: dict[str, Any],
                                              message: str) -> None:
    assert message in refused(tmp_path, yaml.safe_dump({"watch": [entry]}))


def test_prefix_just_under_the_key_limit_is_accepted(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, yaml.safe_dump(
        {"watch": [{"path": "x", "prefix": "p" * 1022}]})))
    assert len(object_key(config.watch[0].prefix, "f").encode()) == 1024


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"watch: [{path: x}]\nsync: {mode: \xff}\n", "not UTF-8 text (byte 32)"),
        ("watch: [{path: x}]\nwatch: [{path: y}]\n", "duplicate key 'watch'"),
        ("watch: [{path: x}]\nsync: {stop_timeout: 5, stop_timeout: 50}\n",
         "duplicate key 'stop_timeout'"),
        ("watch: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 32 levels"),
        ("watch: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", "nested deeper than 32 levels"),
        ("watch: &a [*a]\n", "alias refers to itself"),
        ("watch: [{path: x}]\nsync: {quiet_seconds: !!float abc}\n", "invalid YAML value"),
        ("watch: [{path: x}]\nsync: {quiet_seconds: !!int 1e}\n", "invalid YAML value"),
        ("watch: [{path: x}]\nsync: {delete: !!bool maybe}\n", "invalid YAML value"),
        ("watch: [{path: x}]\nstate: {dir: 2024-02-30}\n", "invalid YAML value"),
        ("watch: [{path: x}]\nsync: {keep_sets: " + "9" * 5000 + "}\n", "invalid YAML value"),
    ],
)
def test_broken_files_are_refused(tmp_path: Path, text: str | bytes, message: str) -> None:
    assert message in refused(tmp_path, text)


def billion_laughs(levels: int = 12, width: int = 10) -> str:
    lines = ['a0: &a0 ["lol"]']
    lines += [f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * width)}]" for n in range(1, levels)]
    return "\n".join(lines) + f"\nwatch: *a{levels - 1}\n"


def test_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    # 10^11 strings if expanded; refused after measuring each of the 12 nodes once.
    assert "aliases expand it past 100000 nodes" in refused(tmp_path, billion_laughs())


def test_a_file_too_large_is_refused_unread(tmp_path: Path) -> None:
    text = "watch: [{path: x}]\n" + "#" * (2 * 2**20) + "\n"
    assert "larger than 1 MiB" in refused(tmp_path, text)


def test_aliases_within_bounds_still_work(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
watch:
  - {path: a, prefix: a/, exclude: &skip ["*.tmp", "*.log"]}
  - {path: b, prefix: b/, exclude: *skip}
"""))
    assert config.watch[1].exclude == ("*.tmp", "*.log")


# -- watch entries never share a key ------------------------------------------------------

@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"path": "a"}, {"path": "b"}),  # both default to checkpoints/
        ({"path": "a", "prefix": "ckpt"}, {"path": "b", "prefix": "ckpt/"}),
        ({"path": "a", "prefix": "a/"}, {"path": "b", "prefix": "a/b/"}),
        ({"path": "a", "prefix": "a"}, {"path": "b", "prefix": "a/b"}),
        ({"path": "a", "prefix": ""}, {"path": "b", "prefix": "anything/"}),
        ({"path": "a", "prefix": "run/"}, {"path": "b", "prefix": "run/.spotwatch/"}),
        ({"path": "a", "prefix": "run"}, {"path": "b", "prefix": "run/.spotwatch/manifests"}),
    ],
)
def test_overlapping_key_spaces_are_refused(tmp_path: Path, first: dict[str, str],
                                            second: dict[str, str]) -> None:
    message = refused(tmp_path, yaml.safe_dump({"watch": [first, second]}))
    assert message.startswith("watch[0] and watch[1] write overlapping keys")


@pytest.mark.parametrize(("first", "second"), [("a/", "ab/"), ("a", "ab"), ("x/y", "x/z"),
                                              ("run1/", "run10/")])
def test_sibling_prefixes_are_accepted(tmp_path: Path, first: str, second: str) -> None:
    config = load_config(write(tmp_path, yaml.safe_dump(
        {"watch": [{"path": "a", "prefix": first}, {"path": "b", "prefix": second}]})))
    assert [w.prefix for w in config.watch] == [first, second]


def test_same_or_nested_watch_paths_are_refused(tmp_path: Path) -> None:
    (tmp_path / "data" / "inner").mkdir(parents=True)
    os.symlink(tmp_path / "data", tmp_path / "link")
    absolute = str(tmp_path / "data")
    for first, second in [("data", absolute), ("data", "./data/"), ("link", "data"),
                          ("data", "data/inner"), ("link/inner", absolute),
                          ("data/inner", "link")]:
        text = yaml.safe_dump({"watch": [{"path": first, "prefix": "p/"},
                                         {"path": second, "prefix": "q/"}]})
        assert "watch the same files" in refused(tmp_path, text), (first, second)


def test_sibling_directories_are_accepted(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, yaml.safe_dump({"watch": [
        {"path": "data", "prefix": "p/"}, {"path": "data2", "prefix": "q/"}]})))
    assert len(config.watch) == 2


def test_spotwatch_files_inside_a_watched_directory_are_refused(tmp_path: Path) -> None:
    """The ledger or the notice file inside a watched directory would be uploaded as
    checkpoints (the ledger after every upload, forever; the notice as the newest set)."""
    (tmp_path / "data" / "inner").mkdir(parents=True)
    os.symlink(tmp_path / "data", tmp_path / "link")
    watch = [{"path": "elsewhere", "prefix": "p/"}, {"path": "data", "prefix": "q/"}]
    for key, value in [("state.dir", "data"), ("state.dir", "data/state"),
                       ("state.dir", "./data/inner/"), ("state.dir", "link/state"),
                       ("state.dir", str(tmp_path / "data" / "x" / "..")),
                       ("hooks.notice_file", "data/notice.json"),
                       ("hooks.notice_file", "link/inner/notice.json")]:
        section, name = key.split(".")
        text = yaml.safe_dump({"watch": watch, section: {name: value}})
        message = refused(tmp_path, text)
        assert message.startswith(f"config key '{key}'") and "inside watch[1]" in message, value
    beside = yaml.safe_dump({"watch": watch, "state": {"dir": "data2"},
                             "hooks": {"notice_file": "data.json"}})
    assert load_config(write(tmp_path, beside)).state_dir == tmp_path / "data2"


PREFIX = st.text(alphabet="ab/.", max_size=6).filter(
    lambda p: not p.startswith("/") and ".." not in p.split("/"))
RELATIVE = st.lists(st.text(alphabet="ab.", min_size=1, max_size=3).filter(lambda c: c != ".."),
                    min_size=1, max_size=3).map("/".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=PREFIX, second=PREFIX, paths=st.lists(st.tuples(RELATIVE, RELATIVE), max_size=5))
def test_accepted_watch_entries_never_share_a_key(tmp_path_factory: pytest.TempPathFactory,
                                                   first: str, second: str,
                                                   paths: list[tuple[str, str]]) -> None:
    """Whatever two prefixes are accepted, no file (or manifest) of one maps to a key of the
    other; and a refusal always names a real overlap of the two key spaces."""
    directory = tmp_path_factory.mktemp("c")
    text = yaml.safe_dump({"watch": [{"path": "a", "prefix": first},
                                     {"path": "b", "prefix": second}]})
    try:
        load_config(write(directory, text))
    except ConfigError:
        spaces = sorted((object_key(first, ""), object_key(second, "")), key=len)
        assert spaces[1].startswith(spaces[0])
        return
    for one, other in paths:
        assert object_key(first, one) != object_key(second, other)
        assert manifest_key(first, one) != object_key(second, other)
        assert object_key(first, one) != manifest_key(second, other)


# -- whatever the input: a Config or a ConfigError ----------------------------------------

SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10**40),
           max_value=10**40) | st.floats() | st.text(max_size=20)
           | st.sampled_from(["", "64MB", "http://127.0.0.1:1", "CRC32C", "on-notice", "a/"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


def assert_config_or_config_error(path: Path) -> None:
    try:
        config = load_config(path)
    except ConfigError as exc:
        assert "\n" not in str(exc)
    else:
        assert_possible(config)


def assert_possible(config: Config) -> None:
    """What a loaded Config promises the rest of spotwatch."""
    durations = [config.sync.settle_seconds, config.sync.quiet_seconds,
                 config.sync.stop_timeout, config.imds.poll_interval, config.imds.timeout]
    assert all(math.isfinite(d) and 0 < d <= 86400 for d in durations)
    assert 5 * 2**20 <= config.transfer.multipart_chunksize <= 5 * 2**30
    assert 1 <= config.transfer.multipart_threshold <= 5 * 2**30
    assert config.imds.endpoint is None or config.imds.endpoint.startswith("http://")
    for watch in config.watch:
        assert str(watch.path) and len(object_key(watch.prefix, "").encode()) < 1024
        for text in (watch.prefix, *watch.exclude, *watch.include):
            assert not any(unicodedata.category(c) == "Cc" for c in text)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(["watch", *(key.replace("[]", "") for key in config_keys())]),
       value=VALUES)
def test_any_value_for_any_key(tmp_path_factory: pytest.TempPathFactory, key: str,
                               value: Any) -> None:
    document: dict[str, Any] = {"watch": [{"path": "x"}]}
    section, _, name = key.partition(".")
    if section == "watch":
        document["watch"][0][name] = value
    elif name:
        document[section] = {name: value}
    else:
        document[section] = value
    path = write(tmp_path_factory.mktemp("c"), yaml.safe_dump(document, allow_unicode=True))
    assert_config_or_config_error(path)


YAMLISH = st.lists(st.sampled_from([*"watch:path[]{}-&*!|>'\"\n #,.?x0e5\t\\",
                                    "\x00", "\ud800", "é", "<<", ".nan", "!!int", "sync:",
                                    "  ", "&a ", "*a", "- path: x\n"]), max_size=60).map("".join)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=YAMLISH)
def test_any_yamlish_text(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.mktemp("c") / "config.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    assert_config_or_config_error(path)


# -- the command line ----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("sections", "fragment"),
    [
        ({"sync": {"quiet_seconds": math.nan}}, "'sync.quiet_seconds' must be a finite number"),
        ({"imds": {"poll_interval": math.inf}}, "'imds.poll_interval' must be a finite number"),
        ({"imds": {"endpoint": "169.254.169.254"}}, "'imds.endpoint' must be an http URL"),
        ({"transfer": {"multipart_chunksize": "6GiB"}}, "from 5 MiB to 5 GiB"),
        ({"watch": [{"path": "a"}, {"path": "b"}]}, "write overlapping keys"),
        ({"state": {"dir": "checkpoints/.state"}}, "'state.dir' (" ),
    ],
)
def test_cli_refuses_impossible_values(workspace: Workspace, sections: dict[str, Any],
                                       fragment: str) -> None:
    workspace.write_config(**sections)
    assert_usage_error(workspace.cli("run", "-c", "config.yaml"), fragment)


def test_cli_refuses_duplicate_keys_and_bombs(workspace: Workspace) -> None:
    workspace.config_file.write_text("watch: [{path: x}]\nwatch: [{path: y}]\n")
    assert_usage_error(workspace.cli("check", "-c", "config.yaml"), "duplicate key 'watch'")
    workspace.config_file.write_text(billion_laughs())
    assert_usage_error(workspace.cli("check", "-c", "config.yaml"), "aliases expand it")
    workspace.config_file.write_bytes(b"watch: [{path: \xe9}]\n")
    assert_usage_error(workspace.cli("check", "-c", "config.yaml"), "not UTF-8 text")


def test_an_unforeseen_validation_message_is_still_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import spotwatch.config as config_module

    def unforeseen(message: str, raw: object) -> str:
        raise IndexError("a shape of error the message builder does not know")

    monkeypatch.setattr(config_module, "_refusal", unforeseen)
    path = tmp_path / "config.yaml"
    path.write_text("watch: [{path: .}]\nsync: {keep_sets: many}\n")
    with pytest.raises(ConfigError) as refused:
        config_module.load_config(path)
    assert "keep_sets" in str(refused.value) and "\n" not in str(refused.value)
