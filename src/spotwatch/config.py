"""Loading and validating config.yaml into typed, immutable settings."""

from __future__ import annotations

import math
import os
import re
import signal
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from spotwatch.errors import ConfigError
from spotwatch.keys import object_key
from spotwatch.state import default_state_dir

MiB = 1024 * 1024
GiB = 1024 * MiB
CONFIG_SEARCH_PATH = (Path("config.yaml"), Path("/etc/spotwatch/config.yaml"))
CHECKSUM_ALGORITHMS = ("CRC32", "CRC32C", "SHA1", "SHA256", "CRC64NVME")
# botocore computes these only with the AWS CRT (awscrt, the botocore[crt] extra).
CRT_CHECKSUM_ALGORITHMS = ("CRC32C", "CRC64NVME")
# S3's limits: parts of a multipart upload, a single PUT, and the length of a key.
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 * GiB
MAX_SINGLE_PUT = 5 * GiB
MAX_KEY_BYTES = 1024
# No duration in the config means more than a day; longer is a typo (and overflows timers).
MAX_SECONDS = 86400.0
# Bounds on the config file itself, so that loading a hostile or broken file stays cheap.
MAX_CONFIG_BYTES = 1 * MiB
MAX_YAML_DEPTH = 32
MAX_YAML_NODES = 100_000
SYNC_MODES = ("continuous", "on-notice")
# Server-side encryption asked for on upload: none (the bucket default applies), SSE-S3, SSE-KMS.
SSE_MODES = ("none", "AES256", "aws:kms")
LOG_FORMATS = ("auto", "json", "console")


@dataclass(frozen=True)
class WatchDir:
    path: Path
    prefix: str = "checkpoints/"
    exclude: tuple[str, ...] = ("*.tmp", "*.tmp/*", "__pycache__/*", ".git/*")
    include: tuple[str, ...] = ()


@dataclass(frozen=True)
class SyncSettings:
    mode: str = "continuous"
    # After a close-write (or rename into place) a file is complete once this long passes quietly.
    settle_seconds: float = 0.3
    # Without a close-write event, a file is taken as complete after this long without changes.
    quiet_seconds: float = 5.0
    # How long a SIGTERM may spend on the final flush (systemd's TimeoutStopSec must be longer).
    stop_timeout: float = 100.0
    # Delete from S3 what spotwatch uploaded and was then deleted locally.
    delete: bool = False
    # Keep only this many newest complete checkpoint sets in S3 (0 keeps all).
    keep_sets: int = 0


@dataclass(frozen=True)
class TransferSettings:
    multipart_threshold: int = 64 * MiB
    multipart_chunksize: int = 16 * MiB
    max_concurrency: int = 20
    checksum_algorithm: str = "CRC32"
    max_attempts: int = 10
    sse: str = "none"
    sse_kms_key_id: str | None = None


@dataclass(frozen=True)
class ImdsSettings:
    enabled: bool = True
    endpoint: str | None = None
    endpoint_mode: str | None = None
    poll_interval: float = 1.0
    token_ttl: int = 21600
    timeout: float = 2.0


@dataclass(frozen=True)
class NoticeSettings:
    """Which notices besides the spot interruption (always on) start a flush."""

    rebalance: bool = True
    scheduled_events: bool = True
    asg_lifecycle: bool = True


@dataclass(frozen=True)
class HookSettings:
    """What training code is told when a notice arrives."""

    notice_file: Path | None = None  # default: <state dir>/notice.json
    signal: str | None = None  # e.g. SIGUSR1, sent to the pid in pid_file
    pid_file: Path | None = None
    command: str | None = None  # run with /bin/sh, SPOTWATCH_NOTICE_* in its environment


@dataclass(frozen=True)
class MetricsSettings:
    """Prometheus /metrics and /healthz; localhost only unless told otherwise."""

    enabled: bool = True
    address: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True)
class Config:
    region: str | None = None  # None: the SDK's resolution, else IMDS (spotwatch.aws.region)
    allow_cross_region: bool = False
    allow_public_bucket: bool = False
    watch: tuple[WatchDir, ...] = ()
    sync: SyncSettings = field(default_factory=SyncSettings)
    transfer: TransferSettings = field(default_factory=TransferSettings)
    imds: ImdsSettings = field(default_factory=ImdsSettings)
    notices: NoticeSettings = field(default_factory=NoticeSettings)
    hooks: HookSettings = field(default_factory=HookSettings)
    log: LogSettings = field(default_factory=LogSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    state_dir: Path = Path("/var/lib/spotwatch")
    source: Path | None = None



# The schema: each key maps to its accepted type(s); nested mappings are sections.
_SIZE = (int, str)
_NUMBER = (int, float)
_SCHEMA: dict[str, Any] = {
    "aws": {"region": str, "allow_cross_region": bool, "allow_public_bucket": bool},
    "watch": list,
    "sync": {
        "mode": str,
        "settle_seconds": _NUMBER,
        "quiet_seconds": _NUMBER,
        "stop_timeout": _NUMBER,
        "delete": bool,
        "keep_sets": int,
    },
    "transfer": {
        "multipart_threshold": _SIZE,
        "multipart_chunksize": _SIZE,
        "max_concurrency": int,
        "checksum_algorithm": str,
        "max_attempts": int,
        "sse": str,
        "sse_kms_key_id": (str, type(None)),
    },
    "imds": {
        "enabled": bool,
        "endpoint": (str, type(None)),
        "endpoint_mode": (str, type(None)),
        "poll_interval": _NUMBER,
        "token_ttl": int,
        "timeout": _NUMBER,
    },
    "notices": {"rebalance": bool, "scheduled_events": bool, "asg_lifecycle": bool},
    "hooks": {
        "notice_file": (str, type(None)),
        "signal": (str, type(None)),
        "pid_file": (str, type(None)),
        "command": (str, type(None)),
    },
    "state": {"dir": str},
    "log": {"level": str, "format": str},
    "metrics": {"enabled": bool, "address": str, "port": int},
}
_WATCH_SCHEMA: dict[str, Any] = {"path": str, "prefix": str, "exclude": list, "include": list}
_REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
# At most 15 ASCII digits: far past any S3 size, and int() never meets a huge string.
_SIZE_RE = re.compile(r"^\s*([0-9]{1,15})\s*(B|KB|KIB|MB|MIB|GB|GIB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"B": 1, "KB": 1024, "KIB": 1024, "MB": MiB, "MIB": MiB, "GB": GiB, "GIB": GiB}
# String keys that may be empty (the bucket root) or span lines (a shell script).
_MAY_BE_EMPTY = frozenset({"prefix"})
_MAY_SPAN_LINES = frozenset({"command"})
_LINE_BREAKS = frozenset("\n\t")


def find_config_file(explicit: str | None) -> Path:
    """The config file by the contract's lookup order: -c, $SPOTWATCH_CONFIG, ./, /etc/."""
    chosen = explicit or os.environ.get("SPOTWATCH_CONFIG")
    if chosen:
        path = Path(chosen)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    for candidate in CONFIG_SEARCH_PATH:
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(p) for p in CONFIG_SEARCH_PATH)
    raise ConfigError(
        f"no config file: pass -c CONFIG or set SPOTWATCH_CONFIG (searched {searched})"
    )


def load_config(path: Path) -> Config:
    """Read, validate and type a config file; every problem is a one-line ConfigError."""
    raw = _parse_yaml(_read_text(path), path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    _check_section(raw, _SCHEMA, "")
    return _build(raw, path)


def _read_text(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // MiB} MiB: not a config file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that also refuses duplicate keys (which one would win?) and nesting deeper
    than MAX_YAML_DEPTH (the composer recurses: thousands of levels overflow the stack)."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_YAML_DEPTH} levels",
                    self.peek_event().start_mark)  # type: ignore[no-untyped-call]
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, path: Path) -> Any:
    """The document's data; aliases may not expand it past MAX_YAML_NODES (billion laughs)."""
    loader: _StrictLoader | None = None
    try:
        loader = _StrictLoader(text)  # checks the characters first
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    except (ValueError, LookupError, TypeError, ArithmeticError) as exc:
        # A tagged or implicit scalar that does not convert (!!int x, 2024-02-30, !!bool maybe).
        raise ConfigError(f"{path}: invalid YAML value: {_shown(str(exc))}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _check_expansion(root: yaml.Node) -> None:
    """Size and depth of the document with every alias expanded, without expanding it: an
    alias is the same node object, so each node is measured once (iteratively: no recursion)."""
    measured: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, depth), aliases expanded
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    entered: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        if id(node) in measured:
            continue
        children = list(_children(node))
        if children_done:
            nodes = 1 + sum(measured[id(child)][0] for child in children)
            depth = 1 + max((measured[id(child)][1] for child in children), default=0)
            if nodes > MAX_YAML_NODES or depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"aliases expand it past {MAX_YAML_NODES} nodes or "
                    f"{MAX_YAML_DEPTH} levels", node.start_mark)
            measured[id(node)] = (nodes, depth)
            continue
        if id(node) in entered:
            raise yaml.composer.ComposerError(None, None, "an alias refers to itself",
                                              node.start_mark)
        entered.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in measured)


def _children(node: yaml.Node) -> Iterator[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        yield from node.value
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield key
            yield value


def parse_size(value: int | str, key: str) -> int:
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.match(value)
        if not match:
            raise ConfigError(f"{key}: not a size: {_shown(value)} (use bytes or e.g. '64MB')")
        size = int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "B").upper()]
    if size <= 0:
        raise ConfigError(f"{key}: must be positive, got {_shown(value)}")
    return size


def _shown(value: object) -> str:
    """A value for an error line: repr (escapes control characters), cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _type_names(expected: Any) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    names = {int: "integer", float: "number", str: "string", bool: "boolean", list: "list"}
    return " or ".join(names.get(t, "null") for t in types)


def _check_section(raw: Mapping[str, Any], schema: Mapping[str, Any], prefix: str) -> None:
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            known = ", ".join(sorted(schema))
            raise ConfigError(f"unknown config key {_shown(dotted)} (known here: {known})")
        expected = schema[key]
        if isinstance(expected, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' must be a mapping")
            _check_section(value, expected, f"{dotted}.")
            continue
        _check_value(value, expected, dotted)


def _check_value(value: Any, expected: Any, dotted: str) -> None:
    """The one check every scalar of the config passes: the declared type (a YAML 'yes' is no
    count although bool subclasses int), numbers finite, text printable (see _check_text)."""
    is_bool_mismatch = isinstance(value, bool) and bool not in _as_tuple(expected)
    if is_bool_mismatch or not isinstance(value, expected):
        shown = "null" if value is None else type(value).__name__
        raise ConfigError(f"config key '{dotted}' must be {_type_names(expected)}, got {shown}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{dotted}' must be a finite number, got {value}")
    if isinstance(value, str):
        _check_text(value, dotted)


def _check_text(value: str, dotted: str) -> None:
    """Config text is never empty (except a prefix: the bucket root), holds no control
    characters (except line breaks in a hook command) and is encodable as UTF-8."""
    leaf = dotted.rsplit(".", 1)[-1]
    if not value and leaf not in _MAY_BE_EMPTY:
        raise ConfigError(f"config key '{dotted}' must not be empty")
    allowed = _LINE_BREAKS if leaf in _MAY_SPAN_LINES else frozenset()
    if any(unicodedata.category(c) == "Cc" and c not in allowed for c in value):
        raise ConfigError(f"config key '{dotted}' contains a control character: {_shown(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"config key '{dotted}' is not valid Unicode: {_shown(value)}") from None


def _as_tuple(expected: Any) -> tuple[Any, ...]:
    return expected if isinstance(expected, tuple) else (expected,)


def _choice(value: str, allowed: tuple[str, ...], key: str) -> str:
    if value not in allowed:
        raise ConfigError(
            f"config key '{key}' must be one of {', '.join(allowed)}, got {_shown(value)}")
    return value


def _at_least(value: int, minimum: int, key: str) -> int:
    if value < minimum:
        raise ConfigError(f"config key '{key}' must be at least {minimum}")
    return value


def _seconds(value: float, key: str) -> float:
    """A duration: positive and at most MAX_SECONDS (finite: checked with every number)."""
    if not 0 < value <= MAX_SECONDS:
        raise ConfigError(f"config key '{key}' must be more than 0 and at most "
                          f"{MAX_SECONDS:.0f} seconds, got {_shown(value)}")
    return float(value)


def _build(raw: Mapping[str, Any], source: Path) -> Config:
    aws = raw.get("aws", {})
    region = aws.get("region")
    if region is not None and not _REGION_RE.match(region):
        raise ConfigError(f"config key 'aws.region' is not an AWS region name: {_shown(region)}")
    state = raw.get("state", {})
    return Config(
        region=region,
        allow_cross_region=aws.get("allow_cross_region", False),
        allow_public_bucket=aws.get("allow_public_bucket", False),
        watch=_build_watch(raw.get("watch", []), source.parent),
        sync=_build_sync(raw.get("sync", {})),
        transfer=_build_transfer(raw.get("transfer", {})),
        imds=_build_imds(raw.get("imds", {})),
        notices=NoticeSettings(**raw.get("notices", {})),
        hooks=_build_hooks(raw.get("hooks", {}), source.parent),
        log=_build_log(raw.get("log", {})),
        metrics=_build_metrics(raw.get("metrics", {})),
        state_dir=_resolve(state["dir"], source.parent, "state.dir") if "dir" in state
        else default_state_dir(),
        source=source,
    )


def _resolve(value: str, base: Path, key: str) -> Path:
    """A configured path: '~' expanded, a relative one taken from the config file's directory."""
    try:
        path = Path(value).expanduser()
        return path if path.is_absolute() else (base / path).resolve()
    except (OSError, RuntimeError) as exc:  # an unknown ~user, a symlink loop
        raise ConfigError(f"config key '{key}' is not a usable path: {_shown(value)} ({exc})"
                          ) from None


def _build_watch(entries: list[Any], base: Path) -> tuple[WatchDir, ...]:
    if not entries:
        raise ConfigError("config key 'watch' must list at least one directory")
    dirs = tuple(_build_watch_dir(entry, f"watch[{index}]", base)
                 for index, entry in enumerate(entries))
    _refuse_overlaps(dirs)
    return dirs


def _build_watch_dir(entry: Any, where: str, base: Path) -> WatchDir:
    if not isinstance(entry, dict):
        raise ConfigError(f"config key '{where}' must be a mapping with a 'path'")
    _check_section(entry, _WATCH_SCHEMA, f"{where}.")
    if "path" not in entry:
        raise ConfigError(f"config key '{where}.path' is required")
    prefix = entry.get("prefix", WatchDir.prefix)
    if prefix.startswith("/") or ".." in prefix.split("/"):
        raise ConfigError(f"config key '{where}.prefix' must be a relative key prefix")
    if len(key_space(prefix).encode()) >= MAX_KEY_BYTES:
        raise ConfigError(f"config key '{where}.prefix' leaves no room for a key within S3's "
                          f"{MAX_KEY_BYTES} bytes")
    patterns = {}
    for name in ("exclude", "include"):
        values = entry.get(name, list(getattr(WatchDir, name)))
        for value in values:
            _check_value(value, str, f"{where}.{name}")
        patterns[name] = tuple(values)
    return WatchDir(
        path=_resolve(entry["path"], base, f"{where}.path"),
        prefix=prefix,
        exclude=patterns["exclude"],
        include=patterns["include"],
    )


def key_space(prefix: str) -> str:
    """What every key of a watch entry with this prefix starts with, its manifests included
    (object_key adds the '/': 'ckpt' and 'ckpt/' are one key space, 'a/' and 'ab/' two)."""
    return object_key(prefix, "")


def _refuse_overlaps(dirs: tuple[WatchDir, ...]) -> None:
    """Invariant: two watch entries never map to the same key. Every key of an entry starts
    with its key space, and any name may follow it; so two entries can collide exactly when
    one key space is a string prefix of the other. A directory watched twice, or inside
    another watched one, would upload its files under two prefixes and race on the ledger."""
    for later, second in enumerate(dirs):
        for index, first in enumerate(dirs[:later]):
            pair = f"watch[{index}] and watch[{later}]"
            spaces = sorted((key_space(first.prefix), key_space(second.prefix)), key=len)
            if spaces[1].startswith(spaces[0]):
                raise ConfigError(f"{pair} write overlapping keys (prefixes {first.prefix!r} "
                                  f"and {second.prefix!r}): give each its own prefix")
            paths = sorted((_real(first.path), _real(second.path)), key=lambda p: len(p.parts))
            if paths[0] == paths[1] or paths[0] in paths[1].parents:
                raise ConfigError(f"{pair} watch the same files ({first.path} and "
                                  f"{second.path}): list each directory once, none inside another")


def _real(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:
        raise ConfigError(f"watch path {path} cannot be resolved: {exc}") from None


def _build_sync(raw: Mapping[str, Any]) -> SyncSettings:
    defaults = SyncSettings()
    return SyncSettings(
        mode=_choice(raw.get("mode", defaults.mode), SYNC_MODES, "sync.mode"),
        settle_seconds=_seconds(raw.get("settle_seconds", defaults.settle_seconds),
                                "sync.settle_seconds"),
        quiet_seconds=_seconds(raw.get("quiet_seconds", defaults.quiet_seconds),
                               "sync.quiet_seconds"),
        stop_timeout=_seconds(raw.get("stop_timeout", defaults.stop_timeout),
                              "sync.stop_timeout"),
        delete=raw.get("delete", defaults.delete),
        keep_sets=_at_least(raw.get("keep_sets", defaults.keep_sets), 0, "sync.keep_sets"),
    )


def _build_transfer(raw: Mapping[str, Any]) -> TransferSettings:
    """Sizes within S3's limits. A file that would need more than 10,000 parts at this chunk
    size (over 48.8 GiB at 5 MiB) gets bigger parts from s3transfer's ChunksizeAdjuster."""
    defaults = TransferSettings()
    concurrency = raw.get("max_concurrency", defaults.max_concurrency)
    if not 1 <= concurrency <= 256:
        raise ConfigError("config key 'transfer.max_concurrency' must be from 1 to 256")
    attempts = raw.get("max_attempts", defaults.max_attempts)
    if not 1 <= attempts <= 50:
        raise ConfigError("config key 'transfer.max_attempts' must be from 1 to 50")
    sse = _choice(raw.get("sse", defaults.sse), SSE_MODES, "transfer.sse")
    kms_key = raw.get("sse_kms_key_id")
    if kms_key is not None and sse != "aws:kms":
        raise ConfigError("config key 'transfer.sse_kms_key_id' needs 'transfer.sse: aws:kms'")
    return TransferSettings(
        multipart_threshold=_size_within(
            raw.get("multipart_threshold", defaults.multipart_threshold),
            "transfer.multipart_threshold", 1, MAX_SINGLE_PUT),
        multipart_chunksize=_size_within(
            raw.get("multipart_chunksize", defaults.multipart_chunksize),
            "transfer.multipart_chunksize", MIN_PART_SIZE, MAX_PART_SIZE),
        max_concurrency=concurrency,
        checksum_algorithm=_checksum_algorithm(
            raw.get("checksum_algorithm", defaults.checksum_algorithm)),
        max_attempts=attempts,
        sse=sse,
        sse_kms_key_id=kms_key,
    )


def _size_within(value: int | str, key: str, minimum: int, maximum: int) -> int:
    size = parse_size(value, key)
    if not minimum <= size <= maximum:
        raise ConfigError(f"config key '{key}' must be from {_size_text(minimum)} to "
                          f"{_size_text(maximum)} (S3's limits), got {_shown(value)}")
    return size


def _size_text(size: int) -> str:
    for unit, factor in (("GiB", GiB), ("MiB", MiB)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} bytes"


def _checksum_algorithm(value: str) -> str:
    key = "transfer.checksum_algorithm"
    algorithm = _choice(value.upper(), CHECKSUM_ALGORITHMS, key)
    if algorithm in CRT_CHECKSUM_ALGORITHMS and not _crt_available():
        raise ConfigError(f"config key '{key}': {algorithm} needs the AWS CRT, which is not "
                          "available (pip install 'botocore[crt]'; BOTO_DISABLE_CRT unset)")
    return algorithm


def _crt_available() -> bool:
    from botocore.compat import HAS_CRT  # botocore's own test: awscrt importable, not disabled

    return bool(HAS_CRT)


def _build_imds(raw: Mapping[str, Any]) -> ImdsSettings:
    defaults = ImdsSettings()
    ttl = raw.get("token_ttl", defaults.token_ttl)
    if not 1 <= ttl <= 21600:
        raise ConfigError("config key 'imds.token_ttl' must be from 1 to 21600 seconds")
    mode = raw.get("endpoint_mode")
    if mode is not None:
        mode = _choice(mode, ("IPv4", "IPv6"), "imds.endpoint_mode")
    endpoint = raw.get("endpoint")
    return ImdsSettings(
        enabled=raw.get("enabled", defaults.enabled),
        endpoint=None if endpoint is None else _http_url(endpoint, "imds.endpoint"),
        endpoint_mode=mode,
        poll_interval=_seconds(raw.get("poll_interval", defaults.poll_interval),
                               "imds.poll_interval"),
        token_ttl=ttl,
        timeout=_seconds(raw.get("timeout", defaults.timeout), "imds.timeout"),
    )


def _http_url(value: str, key: str) -> str:
    if not _is_http_host_url(value):
        raise ConfigError(f"config key '{key}' must be an http URL of a host, e.g. "
                          f"http://169.254.169.254, got {_shown(value)}")
    return value


def _is_http_host_url(value: str) -> bool:
    """IMDS speaks plain http at a host and optional port: no path, query or credentials."""
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError when not a number from 0 to 65535
    except ValueError:
        return False
    return (parts.scheme == "http" and bool(parts.hostname) and port != 0
            and parts.path in ("", "/") and not parts.query and not parts.fragment
            and parts.username is None)


def _build_hooks(raw: Mapping[str, Any], base: Path) -> HookSettings:
    def path(key: str) -> Path | None:
        return _resolve(raw[key], base, f"hooks.{key}") if raw.get(key) else None

    signal_name = raw.get("signal")
    if signal_name is not None:
        signal_name = signal_name.upper()
        if not signal_name.startswith("SIG"):
            signal_name = "SIG" + signal_name
        if signal_name not in signal.Signals.__members__:
            raise ConfigError(
                f"config key 'hooks.signal' is not a signal name: {_shown(raw['signal'])}")
        if not raw.get("pid_file"):
            raise ConfigError("config key 'hooks.signal' needs 'hooks.pid_file' (whom to signal)")
    return HookSettings(notice_file=path("notice_file"), signal=signal_name,
                        pid_file=path("pid_file"), command=raw.get("command") or None)


def _build_metrics(raw: Mapping[str, Any]) -> MetricsSettings:
    settings = MetricsSettings(**raw)
    if not 0 <= settings.port <= 65535:
        raise ConfigError("config key 'metrics.port' must be from 0 to 65535 (0: any free port)")
    return settings


def _build_log(raw: Mapping[str, Any]) -> LogSettings:
    level = raw.get("level", "info").lower()
    return LogSettings(
        level=_choice(level, ("debug", "info", "warning", "error"), "log.level"),
        format=_choice(raw.get("format", "auto"), LOG_FORMATS, "log.format"),
    )


def require_watch_dirs(config: Config) -> None:
    """The watched directories must exist before the daemon or a flush can start."""
    for watch in config.watch:
        try:
            exists = watch.path.is_dir()
        except OSError as exc:  # e.g. a name too long for the file system
            raise ConfigError(f"watch directory {watch.path}: {exc.strerror}") from None
        if not exists:
            raise ConfigError(f"watch directory does not exist: {watch.path}")
