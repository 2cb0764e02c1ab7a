"""Loading and validating config.yaml into typed, immutable settings."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spotwatch.errors import ConfigError
from spotwatch.state import default_state_dir

MiB = 1024 * 1024
DEFAULT_REGION = "us-west-2"
CONFIG_SEARCH_PATH = (Path("config.yaml"), Path("/etc/spotwatch/config.yaml"))
CHECKSUM_ALGORITHMS = ("CRC32", "CRC32C", "SHA1", "SHA256", "CRC64NVME")
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
    region: str = DEFAULT_REGION
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
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KB|KIB|MB|MIB|GB|GIB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"B": 1, "KB": 1024, "KIB": 1024, "MB": MiB, "MIB": MiB, "GB": 1024 * MiB}
_SIZE_UNITS["GIB"] = _SIZE_UNITS["GB"]


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
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    _check_section(raw, _SCHEMA, "")
    return _build(raw, path)


def parse_size(value: int | str, key: str) -> int:
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.match(value)
        if not match:
            raise ConfigError(f"{key}: not a size: {value!r} (use bytes or e.g. '64MB')")
        size = int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "B").upper()]
    if size <= 0:
        raise ConfigError(f"{key}: must be positive, got {value!r}")
    return size


def _type_names(expected: Any) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    names = {int: "integer", float: "number", str: "string", bool: "boolean", list: "list"}
    return " or ".join(names.get(t, "null") for t in types)


def _check_section(raw: Mapping[str, Any], schema: Mapping[str, Any], prefix: str) -> None:
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            known = ", ".join(sorted(schema))
            raise ConfigError(f"unknown config key '{dotted}' (known here: {known})")
        expected = schema[key]
        if isinstance(expected, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' must be a mapping")
            _check_section(value, expected, f"{dotted}.")
            continue
        # bool is an int subclass in Python; a YAML 'yes' must not pass as a count.
        is_bool_mismatch = isinstance(value, bool) and bool not in _as_tuple(expected)
        if is_bool_mismatch or not isinstance(value, expected):
            shown = "null" if value is None else type(value).__name__
            raise ConfigError(
                f"config key '{dotted}' must be {_type_names(expected)}, got {shown}"
            )


def _as_tuple(expected: Any) -> tuple[Any, ...]:
    return expected if isinstance(expected, tuple) else (expected,)


def _choice(value: str, allowed: tuple[str, ...], key: str) -> str:
    if value not in allowed:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _at_least(value: int, minimum: int, key: str) -> int:
    if value < minimum:
        raise ConfigError(f"config key '{key}' must be at least {minimum}")
    return value


def _positive(value: float, key: str) -> float:
    if value <= 0:
        raise ConfigError(f"config key '{key}' must be positive, got {value}")
    return float(value)


def _build(raw: Mapping[str, Any], source: Path) -> Config:
    aws = raw.get("aws", {})
    region = aws.get("region", DEFAULT_REGION)
    if not _REGION_RE.match(region):
        raise ConfigError(f"config key 'aws.region' is not an AWS region name: {region!r}")
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
        state_dir=_resolve(Path(state["dir"]), source.parent) if "dir" in state
        else default_state_dir(),
        source=source,
    )


def _resolve(path: Path, base: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _build_watch(entries: list[Any], base: Path) -> tuple[WatchDir, ...]:
    if not entries:
        raise ConfigError("config key 'watch' must list at least one directory")
    dirs = []
    for index, entry in enumerate(entries):
        where = f"watch[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"config key '{where}' must be a mapping with a 'path'")
        _check_section(entry, _WATCH_SCHEMA, f"{where}.")
        if "path" not in entry:
            raise ConfigError(f"config key '{where}.path' is required")
        prefix = entry.get("prefix", WatchDir.prefix)
        if prefix.startswith("/") or ".." in prefix.split("/"):
            raise ConfigError(f"config key '{where}.prefix' must be a relative key prefix")
        patterns = {}
        for name in ("exclude", "include"):
            values = entry.get(name, list(getattr(WatchDir, name)))
            if not all(isinstance(v, str) for v in values):
                raise ConfigError(f"config key '{where}.{name}' must be a list of strings")
            patterns[name] = tuple(values)
        dirs.append(
            WatchDir(
                path=_resolve(Path(entry["path"]), base),
                prefix=prefix,
                exclude=patterns["exclude"],
                include=patterns["include"],
            )
        )
    return tuple(dirs)


def _build_sync(raw: Mapping[str, Any]) -> SyncSettings:
    defaults = SyncSettings()
    return SyncSettings(
        mode=_choice(raw.get("mode", defaults.mode), SYNC_MODES, "sync.mode"),
        settle_seconds=_positive(raw.get("settle_seconds", defaults.settle_seconds),
                                 "sync.settle_seconds"),
        quiet_seconds=_positive(raw.get("quiet_seconds", defaults.quiet_seconds),
                                "sync.quiet_seconds"),
        stop_timeout=_positive(raw.get("stop_timeout", defaults.stop_timeout),
                               "sync.stop_timeout"),
        delete=raw.get("delete", defaults.delete),
        keep_sets=_at_least(raw.get("keep_sets", defaults.keep_sets), 0, "sync.keep_sets"),
    )


def _build_transfer(raw: Mapping[str, Any]) -> TransferSettings:
    defaults = TransferSettings()
    chunksize = parse_size(raw.get("multipart_chunksize", defaults.multipart_chunksize),
                           "transfer.multipart_chunksize")
    if chunksize < 5 * MiB:
        raise ConfigError("config key 'transfer.multipart_chunksize' must be at least 5MB (S3)")
    concurrency = raw.get("max_concurrency", defaults.max_concurrency)
    if not 1 <= concurrency <= 256:
        raise ConfigError("config key 'transfer.max_concurrency' must be from 1 to 256")
    attempts = raw.get("max_attempts", defaults.max_attempts)
    if not 1 <= attempts <= 50:
        raise ConfigError("config key 'transfer.max_attempts' must be from 1 to 50")
    algorithm = raw.get("checksum_algorithm", defaults.checksum_algorithm).upper()
    sse = _choice(raw.get("sse", defaults.sse), SSE_MODES, "transfer.sse")
    kms_key = raw.get("sse_kms_key_id")
    if kms_key is not None and sse != "aws:kms":
        raise ConfigError("config key 'transfer.sse_kms_key_id' needs 'transfer.sse: aws:kms'")
    return TransferSettings(
        multipart_threshold=parse_size(
            raw.get("multipart_threshold", defaults.multipart_threshold),
            "transfer.multipart_threshold",
        ),
        multipart_chunksize=chunksize,
        max_concurrency=concurrency,
        checksum_algorithm=_choice(algorithm, CHECKSUM_ALGORITHMS, "transfer.checksum_algorithm"),
        max_attempts=attempts,
        sse=sse,
        sse_kms_key_id=kms_key,
    )


def _build_imds(raw: Mapping[str, Any]) -> ImdsSettings:
    defaults = ImdsSettings()
    ttl = raw.get("token_ttl", defaults.token_ttl)
    if not 1 <= ttl <= 21600:
        raise ConfigError("config key 'imds.token_ttl' must be from 1 to 21600 seconds")
    mode = raw.get("endpoint_mode")
    if mode is not None:
        mode = _choice(mode, ("IPv4", "IPv6"), "imds.endpoint_mode")
    return ImdsSettings(
        enabled=raw.get("enabled", defaults.enabled),
        endpoint=raw.get("endpoint"),
        endpoint_mode=mode,
        poll_interval=_positive(raw.get("poll_interval", defaults.poll_interval),
                                "imds.poll_interval"),
        token_ttl=ttl,
        timeout=_positive(raw.get("timeout", defaults.timeout), "imds.timeout"),
    )


def _build_hooks(raw: Mapping[str, Any], base: Path) -> HookSettings:
    def path(key: str) -> Path | None:
        return _resolve(Path(raw[key]), base) if raw.get(key) else None

    signal_name = raw.get("signal")
    if signal_name is not None:
        signal_name = signal_name.upper()
        if not signal_name.startswith("SIG"):
            signal_name = "SIG" + signal_name
        if signal_name not in signal.Signals.__members__:
            raise ConfigError(f"config key 'hooks.signal' is not a signal name: {raw['signal']!r}")
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
        if not watch.path.is_dir():
            raise ConfigError(f"watch directory does not exist: {watch.path}")
