"""Loading and validating config.yaml into typed, immutable settings.

Every key is declared once, as a field of the Structs below: its name, type, default and
constraints (msgspec's Meta; `unit`/`note`/`item` in Meta.extra word the refusal) and, where the
file's text needs parsing first (sizes like '64MB', paths relative to the config file, names in
any case), a Parse marker. PyYAML reads the text through _StrictLoader (duplicate keys, depth,
alias bombs, size); _with_parsed_values applies the Parse markers; msgspec.convert(strict=True)
types and checks the rest; a refusal becomes one line naming the dotted key (_refusal).
"""

from __future__ import annotations

import functools
import ipaddress
import math
import os
import re
import signal
import stat
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

import msgspec
import yaml
from msgspec import Meta, field
from msgspec import inspect as mi

from spotwatch.errors import ConfigError
from spotwatch.keys import S3_KEY_MAX_BYTES, object_key
from spotwatch.mounts import file_system_type
from spotwatch.state import default_state_dir

MiB = 1024 * 1024
GiB = 1024 * MiB
CONFIG_SEARCH_PATH = (Path("config.yaml"), Path("/etc/spotwatch/config.yaml"))
# botocore computes these only with the AWS CRT (awscrt, the botocore[crt] extra).
CRT_CHECKSUM_ALGORITHMS = ("CRC32C", "CRC64NVME")
# S3's limits: parts of a multipart upload, a single PUT, and the length of a key.
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 * GiB
MAX_SINGLE_PUT = 5 * GiB
# The most requests transfer.max_concurrency may run at once (`s5cmd` runs 256 workers).
MAX_CONCURRENCY = 256
# A bandwidth cap below this would hold a checkpoint back for hours.
MIN_BANDWIDTH = 64 * 1024
# No duration in the config means more than a day; longer is a typo (and overflows timers).
MAX_SECONDS = 86400.0
# Bounds on the config file itself, so that loading a hostile or broken file stays cheap.
MAX_CONFIG_BYTES = 1 * MiB
MAX_YAML_DEPTH = 32
MAX_YAML_NODES = 100_000

# Config text is never empty (except a prefix: the bucket root), holds no control characters
# (except line breaks in a hook command) and no lone surrogates (it must encode as UTF-8).
_LINE = r"[^\x00-\x1f\x7f-\x9f\ud800-\udfff]"
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_SCRIPT = r"[^\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]"
Text = Annotated[str, Meta(min_length=1, pattern=rf"\A{_LINE}*\Z")]
Prefix = Annotated[str, Meta(pattern=rf"\A{_LINE}*\Z")]
Script = Annotated[str, Meta(min_length=1, pattern=rf"\A{_SCRIPT}*\Z")]
REGION_DESCRIPTION = "an AWS region name"
Region = Annotated[str, Meta(min_length=1, pattern=r"\A[a-z]{2}(-[a-z]+)+-\d+\Z",
                             description=REGION_DESCRIPTION)]
# Floors on the poll intervals, so that a typo (0.000001) is refused, not a flood of requests:
# IMDS throttles each instance (1024 packets/s per ENI, shared with DNS and NTP) and may then
# delay the very notice polled for; each peer poll is a paid S3 GET (3,600 an hour at 1 s).
MIN_IMDS_POLL_INTERVAL = 0.1
MIN_PEER_POLL_INTERVAL = 0.05

SyncMode = Literal["continuous", "on-notice"]
ChecksumAlgorithm = Literal["CRC32", "CRC32C", "SHA1", "SHA256", "CRC64NVME"]
# Server-side encryption asked for on upload: none (the bucket default applies), SSE-S3, SSE-KMS.
SseMode = Literal["none", "AES256", "aws:kms"]
# Which transfer client moves file bytes: the AWS CRT's, s3transfer's classic one, or auto
# (the CRT wherever awscrt can be used).
TransferClient = Literal["auto", "crt", "classic"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]
CHECKSUM_ALGORITHMS: tuple[str, ...] = get_args(ChecksumAlgorithm)
SYNC_MODES: tuple[str, ...] = get_args(SyncMode)
SSE_MODES: tuple[str, ...] = get_args(SseMode)
TRANSFER_CLIENTS: tuple[str, ...] = get_args(TransferClient)
# The CRT retries every failed request (its Python binding takes 0 retries as "its default,
# 5"): it cannot keep transfer.max_attempts below this; auto then goes classic.
CRT_MIN_ATTEMPTS = 2
# The fastest NIC the CRT knows (trn1n: 800 Gbit/s), with room; more is a typo.
MAX_TARGET_THROUGHPUT_GBPS = 3200.0
LOG_FORMATS: tuple[str, ...] = get_args(LogFormat)


@dataclass(frozen=True)
class Parse:
    """How a key's value in the file becomes the declared type before it is checked: `takes`
    are the YAML types the key accepts; `parse` gets the value and the config file's directory
    and raises ValueError with the problem ("is not a size: ...")."""

    takes: tuple[type, ...]
    parse: Callable[[Any, Path], Any]
    # What a refusal of another YAML type says the key takes, where naming `takes` would
    # mislead ("a number", not "integer or number or string": most text is refused).
    named: str | None = None


_SIZE_RE = re.compile(r"^\s*([0-9]{1,15})\s*(B|KB|KIB|MB|MIB|GB|GIB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"B": 1, "KB": 1024, "KIB": 1024, "MB": MiB, "MIB": MiB, "GB": GiB, "GIB": GiB}


def _bytes(value: int | str, _base: Path | None = None) -> int:
    """A size: bytes, or a number with a unit (at most 15 digits: int() never meets a huge
    string, and that is far past any S3 size)."""
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(value)
    if not match:
        raise ValueError(f"is not a size: {_shown(value)} (use bytes or e.g. '64MB')")
    return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "B").upper()]


def _is_null_word(value: object) -> bool:
    """'none' or 'null' as text, in any case: a quoted "null" means what a bare null does,
    where a key takes none (the README writes none and null alike)."""
    return isinstance(value, str) and value.strip().lower() in ("none", "null")


def _rate(value: int | str, _base: Path | None = None) -> int | None:
    """Bytes per second: a size, optionally followed by '/s' ('200MB', '200MB/s'); 'none' is
    no rate, as null is."""
    if _is_null_word(value):
        return None
    if isinstance(value, str) and value.rstrip().lower().endswith("/s"):
        value = value.rstrip()[:-2]
    return _bytes(value)


# A number written as text: YAML takes 1e-1 (no dot) and a quoted "0.5" for strings.
_NUMBER_RE = re.compile(r"\s*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*")


def _number(value: float | str, _base: Path) -> float | None:
    """A number, also from text that is a plain decimal or exponent number; finite only (the
    range is the declared type's). No inf, nan or digit separators: not a typo's reading.
    'none' or 'null' as text is null (_is_null_word), which only a key that takes null takes."""
    if not isinstance(value, str):
        return value
    if _is_null_word(value):
        return None
    if not _NUMBER_RE.fullmatch(value):
        raise ValueError(f"must be a number, got {_shown(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"must be a finite number, got {_shown(value)}")
    return number


def _path(value: str, base: Path) -> Path:
    """A configured path: '~' expanded, a relative one taken from the config file's directory."""
    if not re.fullmatch(rf"{_LINE}+", value):
        raise ValueError(_text_problem(value, "a path"))
    try:
        path = Path(value).expanduser()
        # Made absolute, not resolved: a watched path that is a symlink is followed to
        # wherever it leads at the time (sync.tracker).
        return (base / path).absolute()
    except (OSError, RuntimeError) as exc:  # an unknown ~user, a symlink loop
        raise ValueError(f"is not a usable path: {_shown(value)} ({exc})") from None


def _signal_name(value: str, _base: Path) -> str:
    name = value.upper() if value.upper().startswith("SIG") else "SIG" + value.upper()
    if name not in signal.Signals.__members__:
        raise ValueError(f"is not a signal name: {_shown(value)}")
    return name


SIZE = Parse((int, str), _bytes)
NUMBER = Parse((int, float, str), _number, named="a number")
RATE = Parse((int, str), _rate)
PATH = Parse((str,), _path)
UPPER = Parse((str,), lambda value, _base: value.upper())
LOWER = Parse((str,), lambda value, _base: value.lower())
SIGNAL = Parse((str,), _signal_name)
# A key whose "none" is a word (transfer.sse): null means the same.
NULL_AS_NONE = Parse((str, type(None)),
                     lambda value, _base: "none" if value is None or _is_null_word(value)
                     else value)
# Every float key takes NUMBER, so that a number the YAML read as text is still a number.
Seconds = Annotated[float, Meta(gt=0, le=MAX_SECONDS, extra={"unit": "seconds"}), NUMBER]
ImdsPollSeconds = Annotated[float, Meta(ge=MIN_IMDS_POLL_INTERVAL, le=MAX_SECONDS, extra={
    "unit": "seconds", "note": " (IMDS throttles faster polling)"}), NUMBER]
PeerPollSeconds = Annotated[float, Meta(ge=MIN_PEER_POLL_INTERVAL, le=MAX_SECONDS, extra={
    "unit": "seconds", "note": " (each poll is an S3 GET)"}), NUMBER]


def _refuse(key: str, problem: str) -> ValueError:
    """A cross-field refusal from __post_init__; _refusal names the key in full."""
    return ValueError(f"`{key}` {problem}")


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A mapping of the file: immutable, and a key it does not declare is refused."""


class AwsSettings(_Section, frozen=True, kw_only=True):
    region: Region | None = None  # None: the SDK's resolution, else IMDS (spotwatch.aws.region)
    allow_cross_region: bool = False
    allow_public_bucket: bool = False


# The names trainers save under before a rename publishes the checkpoint: excluded by default,
# and their writes count as the trainer still saving (sync.staged_writes). torch.save to a
# .tmp, a step_N.tmp/ staging directory; tmp-checkpoint-N/: Hugging Face Trainer's staging
# directory (transformers 4.36-4.38), renamed checkpoint-N/ when done, or left behind on ranks
# that do not rename it; N.orbax-checkpoint-tmp-T/: Orbax's, renamed N/ once the save is
# finished; a save that failed leaves it (and items inside a step stage in
# ITEM.orbax-checkpoint-tmp-T/ alike).
STAGING_NAMES = ("*.tmp", "*.tmp/*", "tmp-checkpoint-*/*", "*/tmp-checkpoint-*/*",
                 "*.orbax-checkpoint-tmp-*/*")
# watch[].exclude unless configured: the staging names, caches, and *-unfinished, NeMo's marker
# of a checkpoint being saved (keys.unfinished_marker); in the order the README lists them.
DEFAULT_EXCLUDE = (*STAGING_NAMES[:2], "__pycache__/*", ".git/*", *STAGING_NAMES[2:],
                   "*-unfinished")


class WatchDir(_Section, frozen=True):
    path: Annotated[Path, PATH]
    prefix: Prefix = "checkpoints/"
    exclude: tuple[Text, ...] = DEFAULT_EXCLUDE
    include: tuple[Text, ...] = ()
    # Files a set directory must hold before it is sealed (see sync.sets.sealer.unmatched).
    complete_when: tuple[Text, ...] = ()

    def __post_init__(self) -> None:
        if self.prefix.startswith("/") or ".." in self.prefix.split("/"):
            raise _refuse("prefix", "must be a relative key prefix")
        if any(pattern.startswith("/") for pattern in self.complete_when):
            raise _refuse("complete_when", "takes paths inside a set directory, such as "
                          "'.metadata' or '*/trainer_state.json', not absolute ones")
        if len(key_space(self.prefix).encode()) >= S3_KEY_MAX_BYTES:
            raise _refuse("prefix",
                          f"leaves no room for a key within S3's {S3_KEY_MAX_BYTES} bytes")


class SyncSettings(_Section, frozen=True, kw_only=True):
    mode: SyncMode = "continuous"
    # After a close-write (or rename into place) a file is complete once this long passes quietly.
    settle_seconds: Seconds = 0.3
    # Without a close-write event, a file is taken as complete after this long without changes
    # (and no process holding it open for writing: see sync/open_writers).
    quiet_seconds: Seconds = 5.0
    # How long a SIGTERM may spend on the final flush (systemd's TimeoutStopSec must be longer).
    stop_timeout: Seconds = 100.0
    # Scan the watched directories again this often, for changes inotify never reports (writes
    # through a memory mapping); every few seconds while a notice or flush is under way.
    rescan_interval: Seconds = 300.0
    # Delete from S3 what spotwatch uploaded and was then deleted locally.
    delete: bool = False
    # Keep only this many newest complete checkpoint sets in S3 (0 keeps all).
    keep_sets: Annotated[int, Meta(ge=0)] = 0
    # Bytes per second that continuous uploads may send, all together (None: no cap); a
    # notice lifts it at once, and flushes (`spotwatch flush`, SIGTERM) are never capped.
    continuous_bandwidth: Annotated[int, Meta(ge=MIN_BANDWIDTH, extra={
        "unit": "bytes", "note": " per second"}), RATE] | None = None


class TransferSettings(_Section, frozen=True, kw_only=True):
    """Sizes within S3's limits. A file that would need more than 10,000 parts at this chunk
    size (over 48.8 GiB at 5 MiB) gets bigger parts from s3transfer's ChunksizeAdjuster."""

    multipart_threshold: Annotated[int, Meta(ge=1, le=MAX_SINGLE_PUT, extra={
        "unit": "bytes", "note": " (S3's limits)"}), SIZE] = 64 * MiB
    multipart_chunksize: Annotated[int, Meta(ge=MIN_PART_SIZE, le=MAX_PART_SIZE, extra={
        "unit": "bytes", "note": " (S3's limits)"}), SIZE] = 16 * MiB
    max_concurrency: Annotated[int, Meta(ge=1, le=MAX_CONCURRENCY)] = 20
    # CRC32C costs about half the client CPU, but spotwatch 0.1 reads any 4-byte checksum
    # as the configured algorithm's and would refuse a CRC32C set as corrupt: the default
    # stays CRC32 while 0.1 may still restore what this version uploads.
    checksum_algorithm: Annotated[ChecksumAlgorithm, UPPER] = "CRC32"
    max_attempts: Annotated[int, Meta(ge=1, le=50)] = 10
    sse: Annotated[SseMode, NULL_AS_NONE] = "none"
    sse_kms_key_id: Text | None = None
    client: TransferClient = "auto"
    # Gbit/s the CRT sizes its connections for; None: the CRT's figure for this instance type.
    target_throughput: Annotated[float, Meta(gt=0, le=MAX_TARGET_THROUGHPUT_GBPS, extra={
        "unit": "Gbit/s"}), NUMBER] | None = None

    def __post_init__(self) -> None:
        if self.sse_kms_key_id is not None and self.sse != "aws:kms":
            raise _refuse("sse_kms_key_id", "needs 'transfer.sse: aws:kms'")
        if self.client == "crt" and not _crt_available():
            raise _crt_missing("client", "crt")
        if self.client == "crt" and self.max_attempts < CRT_MIN_ATTEMPTS:
            raise _refuse("max_attempts", f"must be at least {CRT_MIN_ATTEMPTS} with "
                          "'transfer.client: crt' (the CRT cannot be kept from retrying)")
        if self.checksum_algorithm in CRT_CHECKSUM_ALGORITHMS and not _crt_available():
            raise _crt_missing("checksum_algorithm", self.checksum_algorithm)

    @property
    def uses_crt(self) -> bool:
        """Whether file transfers go through the AWS CRT: asked for, or auto and available."""
        return self.client == "crt" or (self.client == "auto" and _crt_available()
                                        and self.max_attempts >= CRT_MIN_ATTEMPTS)


class ImdsSettings(_Section, frozen=True, kw_only=True):
    enabled: bool = True
    endpoint: Text | None = None
    endpoint_mode: Literal["IPv4", "IPv6"] | None = None
    poll_interval: ImdsPollSeconds = 1.0
    token_ttl: Annotated[int, Meta(ge=1, le=21600, extra={"unit": "seconds"})] = 21600
    timeout: Seconds = 2.0

    def __post_init__(self) -> None:
        if self.endpoint is not None and not _is_http_host_url(self.endpoint):
            raise _refuse("endpoint", "must be an http URL of a host, e.g. "
                          f"http://169.254.169.254, got {_shown(self.endpoint)}")


class NoticeSettings(_Section, frozen=True, kw_only=True):
    """Which notices besides the spot interruption (always on) start a flush."""

    rebalance: bool = True
    scheduled_events: bool = True
    asg_lifecycle: bool = True


class AsgSettings(_Section, frozen=True, kw_only=True):
    """An Auto Scaling lifecycle hook that waits for spotwatch's flush on scale-in."""

    lifecycle_hook: Text | None = None  # None: no hook, the scale-in is not held
    group: Text | None = None  # None: the instance's aws:autoscaling:groupName tag, else asked
    # Below the hook's heartbeat timeout (AWS allows 30 to 7200 s).
    heartbeat_interval: Annotated[float, Meta(ge=1, le=7200, extra={"unit": "seconds"}),
                                  NUMBER] = 30.0
    # The trainer's time to save its emergency checkpoint once told of the scale-in: CONTINUE
    # is sent no sooner, whatever the flush found durable before that checkpoint began.
    save_grace: Annotated[float, Meta(ge=0, le=7200, extra={"unit": "seconds"}), NUMBER] = 60.0


# A job id becomes part of S3 keys: plain characters only.
JobId = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"\A[A-Za-z0-9][A-Za-z0-9._-]*\Z",
                            description="a job id (letters, digits, '.', '_', '-')")]
MAX_NODES = 4096
# Where the job's settings come from when the file leaves them out, first match wins; the node
# rank from the launcher (torchrun's GROUP_RANK, the NODE_RANK convention, SLURM's SLURM_NODEID).
JOB_ENVIRONMENT: dict[str, tuple[str, ...]] = {
    "id": ("SPOTWATCH_JOB_ID",),
    "nodes": ("SPOTWATCH_JOB_NODES", "SLURM_NNODES"),
    "rank": ("SPOTWATCH_NODE_RANK", "GROUP_RANK", "NODE_RANK", "SLURM_NODEID"),
}


class JobSettings(_Section, frozen=True, kw_only=True):
    """A multi-node job: every node runs its own spotwatch with the same id and node count and
    its own rank. No id: a single node, exactly as without this section."""

    id: JobId | None = None
    nodes: Annotated[int, Meta(ge=1, le=MAX_NODES)] | None = None
    # None is allowed for commands that act for the whole job (restore, status, iam-policy);
    # `run` and `flush` need it (require_node_rank).
    rank: Annotated[int, Meta(ge=0, lt=MAX_NODES)] | None = None
    # How often a node looks for its peers' notices (notices/peers.py: one GET each time).
    peer_poll_interval: PeerPollSeconds = 1.0

    def __post_init__(self) -> None:
        if self.id is None:
            for name in ("nodes", "rank"):
                if getattr(self, name) is not None:
                    raise _refuse(name, "needs 'job.id' (or SPOTWATCH_JOB_ID)")
            return
        if self.nodes is None:
            raise _refuse("nodes", "is needed with 'job.id' (or SPOTWATCH_JOB_NODES, SLURM_NNODES)")
        if self.rank is not None and self.rank >= self.nodes:
            raise _refuse("rank", f"must be below job.nodes ({self.nodes}), got {self.rank}")

    @property
    def is_multi_node(self) -> bool:
        return self.id is not None


class HookSettings(_Section, frozen=True, kw_only=True):
    """What training code is told when a notice arrives."""

    notice_file: Annotated[Path, PATH] | None = None  # default: <state dir>/notice.json
    signal: Annotated[str, SIGNAL] | None = None  # e.g. SIGUSR1, sent to the pid in pid_file
    pid_file: Annotated[Path, PATH] | None = None
    command: Script | None = None  # run with /bin/sh, SPOTWATCH_NOTICE_* in its environment

    def __post_init__(self) -> None:
        if self.signal is not None and self.pid_file is None:
            raise _refuse("signal", "needs 'hooks.pid_file' (whom to signal)")


class MetricsSettings(_Section, frozen=True, kw_only=True):
    """Prometheus /metrics and /healthz; localhost only unless told otherwise."""

    enabled: bool = True
    address: Text = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535, extra={"note": " (0: any free port)"})] = 9464

    def __post_init__(self) -> None:
        if not _is_listen_address(self.address):
            raise _refuse("address", "must be an IP address (IPv6 without brackets) or a host "
                          f"name, without a port, got {_shown(self.address)}")


class LogSettings(_Section, frozen=True, kw_only=True):
    level: Annotated[LogLevel, LOWER] = "info"
    format: LogFormat = "auto"


class StateSettings(_Section, frozen=True, kw_only=True):
    dir: Annotated[Path, PATH] = field(default_factory=default_state_dir)


class Config(_Section, frozen=True, kw_only=True):
    """The whole file; the rest of spotwatch reads the flat properties below."""

    aws: AwsSettings = field(default_factory=AwsSettings)
    watch: Annotated[tuple[WatchDir, ...], Meta(min_length=1, extra={"item": "directory"})]
    sync: SyncSettings = field(default_factory=SyncSettings)
    transfer: TransferSettings = field(default_factory=TransferSettings)
    imds: ImdsSettings = field(default_factory=ImdsSettings)
    notices: NoticeSettings = field(default_factory=NoticeSettings)
    asg: AsgSettings = field(default_factory=AsgSettings)
    job: JobSettings = field(default_factory=JobSettings)
    hooks: HookSettings = field(default_factory=HookSettings)
    state: StateSettings = field(default_factory=StateSettings)
    log: LogSettings = field(default_factory=LogSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)

    @property
    def region(self) -> str | None:
        return self.aws.region

    @property
    def allow_cross_region(self) -> bool:
        return self.aws.allow_cross_region

    @property
    def allow_public_bucket(self) -> bool:
        return self.aws.allow_public_bucket

    @property
    def state_dir(self) -> Path:
        return self.state.dir


def config_keys() -> dict[str, Any]:
    """Every key of the file, dotted ('sync.mode', 'watch[].path'), with its default:
    msgspec.NODEFAULT where it is required or computed when loading (state.dir)."""
    return dict(_keys(mi.type_info(Config), ""))


def _keys(info: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    for item in _container(info).fields:
        inner = _container(item.type)
        if isinstance(inner, mi.StructType):
            yield from _keys(inner, f"{prefix}{item.name}.")
        elif isinstance(inner, mi.VarTupleType) and isinstance(inner.item_type, mi.StructType):
            yield from _keys(inner.item_type, f"{prefix}{item.name}[].")
        else:
            yield f"{prefix}{item.name}", item.default


def find_config_file(explicit: str | Path | None) -> Path:
    """The config file by the contract's lookup order: -c, $SPOTWATCH_CONFIG, ./, /etc/."""
    chosen = explicit or os.environ.get("SPOTWATCH_CONFIG")
    if chosen:
        path = Path(chosen)
        if not _is_config_file(path):
            raise ConfigError(f"config file {path} is a directory" if path.is_dir()
                              else f"config file not found: {path}")
        return path
    for candidate in CONFIG_SEARCH_PATH:
        if _is_config_file(candidate):
            return candidate
    searched = ", ".join(str(p) for p in CONFIG_SEARCH_PATH)
    raise ConfigError(
        f"no config file: pass -c CONFIG or set SPOTWATCH_CONFIG (searched {searched})"
    )


def _is_config_file(path: Path) -> bool:
    """Whether a file is there: any but a directory, so that `-c <(envsubst < tmpl)` (a pipe
    at /dev/fd/N) is read too; a path that cannot even be looked at (a directory on the way
    not searchable by this user, a name too long) is one line, not a traceback."""
    try:
        return not stat.S_ISDIR(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None


def load_config(path: Path) -> Config:
    """Read, validate and type a config file; every problem is a one-line ConfigError."""
    raw = _parse_yaml(_read_text(path), path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    _refuse_surrogates(raw, "")
    raw = _with_job_environment(raw, os.environ)
    try:
        config = msgspec.convert(_with_parsed_values(Config, raw, path.parent, ""), Config,
                                 strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(_one_line_refusal(str(exc), raw)) from None
    _refuse_overlaps(config.watch)
    _refuse_own_files_in_watches(config)
    _refuse_state_dir_not_directory(config.state_dir)
    _refuse_state_dir_on_kernel_fs(config.state_dir)
    return config


def _with_job_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """The job section with what the file leaves out taken from the environment
    (JOB_ENVIRONMENT). Only for a job: without an id anywhere the environment is ignored, so a
    single-node run inside SLURM or torchrun is not turned into a job."""
    job = raw.get("job")
    if job is None:
        job = {}
    if not isinstance(job, dict):
        return raw  # refused with the usual one line by the conversion
    filled = dict(job)
    for name, variables in JOB_ENVIRONMENT.items():
        variable = next((v for v in variables if environ.get(v, "").strip()), None)
        if variable is None:
            continue
        if name in filled:
            _refuse_launcher_disagreement(name, filled, environ, variable)
            continue
        if name == "id":
            filled[name] = environ[variable].strip()
        elif filled.get("id") is not None:
            filled[name] = _whole_number(environ[variable], f"job.{name}", variable)
    if filled.get("id") is None:
        return raw
    return {**raw, "job": filled}


def _refuse_launcher_disagreement(name: str, job: Mapping[str, Any],
                                  environ: Mapping[str, str], variable: str) -> None:
    """The file's job.nodes or job.rank must agree with the launcher's. A file copied from
    another node or from an earlier launch with another node count would otherwise win without
    a word: two nodes sealing one rank's part (a set complete without another node's shards)
    or every set waiting for good on a node that never comes (none complete, none restored)."""
    if name == "id" or job.get("id") is None:
        return
    configured = job[name]
    if not isinstance(configured, int) or isinstance(configured, bool):
        return  # refused with the usual one line by the conversion
    launched = _whole_number(environ[variable], f"job.{name}", variable)
    if launched != configured:
        raise ConfigError(
            f"job.{name} is {configured} in the config file but {variable}={launched} in the "
            f"environment: remove job.{name} from the file to take the launcher's, or make "
            "them agree")


def _whole_number(text: str, key: str, variable: str) -> int:
    if not re.fullmatch(r"\s*[0-9]{1,9}\s*", text):
        raise ConfigError(f"{key}: {variable}={_shown(text)} from the environment is not a "
                          "whole number from 0 to 999999999")
    return int(text)


def require_node_rank(config: Config) -> None:
    """A node of a job must know its rank before it uploads (its part of each set)."""
    if config.job.is_multi_node and config.job.rank is None:
        variables = ", ".join(JOB_ENVIRONMENT["rank"])
        raise ConfigError(f"job.rank is not set: give it in the config or set one of {variables}")


def _refuse_surrogates(value: Any, where: str) -> None:
    """Text must encode as UTF-8: a lone surrogate (a YAML escape such as "\\ud800") is refused
    anywhere in the file, before msgspec (which cannot compare it) sees it."""
    if isinstance(value, str) and _SURROGATE.search(value):
        raise ConfigError(f"config key '{_key_of(where)}' is not valid Unicode: {_shown(value)}")
    if isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_surrogates(item, f"{where}[{index}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_surrogates(key, where)
            _refuse_surrogates(item, _join(where, str(key)))


def _with_parsed_values(cls: type, raw: Any, base: Path, where: str) -> Any:
    """The raw mapping of a section with each Parse-marked value parsed (a value of a type the
    key does not take is left as it is, for msgspec to refuse), sections within recursively."""
    if not isinstance(raw, dict):
        return raw
    hints = _hints(cls)
    parsed = dict(raw)
    for name, value in raw.items():
        hint = hints.get(name) if isinstance(name, str) else None
        marker = _parse_marker(hint)
        nested, many = _section_in(hint)
        if marker is not None and _is_instance(value, marker.takes):
            try:
                parsed[name] = marker.parse(value, base)
            except ValueError as exc:
                raise ConfigError(f"config key '{where}{name}' {exc}") from None
        elif nested is not None and many and isinstance(value, list):
            parsed[name] = [_with_parsed_values(nested, item, base, f"{where}{name}[{index}].")
                            for index, item in enumerate(value)]
        elif nested is not None:
            parsed[name] = _with_parsed_values(nested, value, base, f"{where}{name}.")
    return parsed


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls, include_extras=True)


def _parse_marker(hint: Any) -> Parse | None:
    """The Parse marker in a field's annotation, also inside `X | None`."""
    if get_origin(hint) is Annotated:
        return next((m for m in hint.__metadata__ if isinstance(m, Parse)), None)
    return next(filter(None, map(_parse_marker, get_args(hint))), None)


def _section_in(hint: Any) -> tuple[type | None, bool]:
    """The section type a field holds, and whether it holds a list of them."""
    if isinstance(hint, type) and issubclass(hint, _Section):
        return hint, False
    for arg in get_args(hint):
        nested, many = _section_in(arg)
        if nested is not None:
            return nested, many or get_origin(hint) is tuple
    return None, False


def _is_instance(value: Any, types: tuple[type, ...]) -> bool:
    """isinstance, except that a YAML 'yes' is no count (bool subclasses int)."""
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))


# -- msgspec's refusal, said as one line naming the key -------------------------------------

_AT_KEY = "key` in `"
_STEP = re.compile(r"\.([A-Za-z_]\w*)|\[(\d+)\]")


def _one_line_refusal(message: str, raw: dict[str, Any]) -> str:
    """Bad config is one line, never a traceback: should rebuilding the message meet a shape
    of error it does not know, msgspec's own message (which names the key's path) is used."""
    try:
        return _refusal(message, raw)
    except Exception:  # any failure here would turn a config error into a traceback
        return f"invalid config: {message.splitlines()[0] if message else 'rejected'}"


def _refusal(message: str, raw: dict[str, Any]) -> str:
    """msgspec's "Expected `int`, got `str` - at `$.sync.keep_sets`" as "config key
    'sync.keep_sets' must be integer, got str": the message is rebuilt from the declaration of
    the key and the value in the file, so it says what the key takes."""
    problem, _, at = message.rpartition(" - at `") if " - at `" in message else (message, "", "$")
    steps = [name or int(index) for name, index in _STEP.findall(at.removeprefix(_AT_KEY))]
    struct, name, info, value = _follow(steps, raw)
    dotted = _dotted(steps)
    if problem.startswith("Object contains unknown field") or at.startswith(_AT_KEY):
        return _unknown_key(info, value, dotted)
    missing = re.match(r"Object missing required field `(\w+)`", problem)
    if missing:
        return f"config key '{_join(dotted, missing.group(1))}' is required"
    own = re.match(r"`(\w+)` (.*)", problem)  # raised by a section's __post_init__
    if own:
        sep = "" if own.group(2).startswith(":") else " "
        return f"config key '{_join(dotted, own.group(1))}'{sep}{own.group(2)}"
    marker = _parse_marker(_hints(struct).get(name)) if struct and name else None
    key = dotted if isinstance(_bare(info), mi.StructType) else _key_of(dotted)
    return f"config key '{key}' {_what_it_takes(info, value, marker) or problem}"


def _follow(steps: list[str | int], raw: Any) -> tuple[type | None, str | None, Any, Any]:
    """The declared type and the file's value at a path; with the section and field name of
    the last field on the way (where a Parse marker would be)."""
    info: Any = mi.type_info(Config)
    struct: type | None = None
    name: str | None = None
    value = raw
    for step in steps:
        info = _container(info)
        if isinstance(step, int):
            info = info.item_type
            value = value[step]
        else:
            struct, name = info.cls, step
            info = next(f.type for f in info.fields if f.name == step)
            value = value.get(step) if isinstance(value, dict) else None
    return struct, name, info, value


def _container(info: Any) -> Any:
    """A struct or list type from under Metadata and `| None`."""
    info = _bare(info)
    if isinstance(info, mi.UnionType):
        return next(_bare(t) for t in info.types if not isinstance(_bare(t), mi.NoneType))
    return info


def _bare(info: Any) -> Any:
    return info.type if isinstance(info, mi.Metadata) else info


def _dotted(steps: list[str | int]) -> str:
    return "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in steps).lstrip(".")


def _key_of(dotted: str) -> str:
    """An item of a list is refused under the list's key: 'watch[0].exclude', not '...[2]'."""
    return re.sub(r"(\[\d+\])+$", "", dotted)


def _join(dotted: str, name: str) -> str:
    return f"{dotted}.{name}" if dotted else name


def _unknown_key(info: Any, value: Any, dotted: str) -> str:
    known = [f.name for f in _container(info).fields]
    unknown = next(key for key in value if key not in known)
    return (f"unknown config key {_shown(_join(dotted, str(unknown)))} "
            f"(known here: {', '.join(sorted(known))})")


_TYPE_NAMES: dict[type, tuple[str, tuple[type, ...]]] = {
    mi.BoolType: ("boolean", (bool,)),
    mi.IntType: ("integer", (int,)),
    mi.FloatType: ("integer or number", (int, float)),
    mi.StrType: ("string", (str,)),
    mi.LiteralType: ("string", (str,)),
    mi.CustomType: ("string", (str,)),  # a path
    mi.NoneType: ("null", (type(None),)),
    mi.StructType: ("a mapping", (dict,)),
    mi.VarTupleType: ("a list", (list,)),
}
_PY_NAMES: dict[type, str] = {str: "string", int: "integer", float: "number", bool: "boolean",
                              list: "list", dict: "mapping", type(None): "null"}


def _what_it_takes(info: Any, value: Any, marker: Parse | None) -> str | None:
    """What a key takes, said against the value the file gave it; None if nothing to add."""
    options = info.types if isinstance(info, mi.UnionType) else (info,)
    if marker is not None:  # a value the marker takes was parsed into the declared type
        matching = [t for t in options if not isinstance(t, mi.NoneType)
                    and _is_instance(value, marker.takes)]
    else:
        matching = [t for t in options if _is_instance(value, _TYPE_NAMES[type(_bare(t))][1])]
    if not matching:
        names = ((marker.named or " or ".join(_PY_NAMES[t] for t in marker.takes)) if marker
                 else " or ".join(dict.fromkeys(_TYPE_NAMES[type(_bare(t))][0] for t in options)))
        return f"must be {names}, got {'null' if value is None else type(value).__name__}"
    option = matching[0]
    extra = option.extra if isinstance(option, mi.Metadata) and option.extra else {}
    description = (option.extra_json_schema or {}).get("description") \
        if isinstance(option, mi.Metadata) else None
    return _constraint(_bare(option), value, extra, description)


def _constraint(info: Any, value: Any, extra: dict[str, Any], description: str | None
                ) -> str | None:
    if isinstance(info, mi.FloatType | mi.IntType):
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        return f"must be {_range(info, extra)}{extra.get('note', '')}, got {_shown(value)}"
    if isinstance(info, mi.LiteralType) and _is_plain(value):
        return f"must be one of {', '.join(map(str, info.values))}, got {_shown(value)}"
    if isinstance(value, str):
        return _text_problem(value, description)
    if isinstance(info, mi.VarTupleType):
        return f"must list at least one {extra.get('item', 'entry')}"
    return None


def _range(info: mi.IntType | mi.FloatType, extra: dict[str, Any]) -> str:
    unit = extra.get("unit", "")
    suffix = f" {unit}" if unit and unit != "bytes" else ""  # bytes: each bound has its unit

    def number(bound: float) -> str:
        return _size_text(int(bound)) if unit == "bytes" else f"{bound:g}"

    if info.gt is not None and info.le is not None:
        return f"more than {number(info.gt)} and at most {number(info.le)}{suffix}"
    if info.ge is not None and info.le is not None:
        return f"from {number(info.ge)} to {number(info.le)}{suffix}"
    return f"at least {number(info.ge or 0)}{suffix}"


def _is_plain(value: str) -> bool:
    return bool(value) and re.fullmatch(rf"{_LINE}*", value) is not None


def _text_problem(value: str, description: str | None) -> str:
    """Why a text was refused: empty, not Unicode, a control character, or not `description`."""
    if not value:
        return "must not be empty"
    if _SURROGATE.search(value):
        return f"is not valid Unicode: {_shown(value)}"
    if any(unicodedata.category(c) == "Cc" for c in value):
        return f"contains a control character: {_shown(value)}"
    return f"is not {description or 'allowed'}: {_shown(value)}"


def _size_text(size: int) -> str:
    for unit, factor in (("GiB", GiB), ("MiB", MiB)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} bytes"


def parse_size(value: int | str, key: str) -> int:
    """A positive size in bytes from an int or a text like '64MB'."""
    try:
        size = _bytes(value)
    except ValueError as exc:
        raise ConfigError(f"config key '{key}' {exc}") from None
    if size <= 0:
        raise ConfigError(f"config key '{key}' must be positive, got {_shown(value)}")
    return size


def _shown(value: object) -> str:
    """A value for an error line: repr (escapes control characters), cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _crt_missing(key: str, value: str) -> ValueError:
    return _refuse(key, f": {value} needs the AWS CRT, which is not available "
                   "(pip install 'botocore[crt]'; BOTO_DISABLE_CRT unset)")


def _crt_available() -> bool:
    from botocore.compat import HAS_CRT  # botocore's own test: awscrt importable, not disabled

    return bool(HAS_CRT)


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


# A host name by RFC 1123: dot-separated labels of letters, digits and inner hyphens.
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME_RE = re.compile(rf"(?=.{{1,253}}\Z){_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")


def _is_listen_address(value: str) -> bool:
    """An IPv4 or IPv6 literal, or a host name to resolve. A name whose last label is all
    digits is a mistyped IPv4 address ('999.1.1.1'), not a name: no top-level domain is."""
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        pass
    return (_HOST_NAME_RE.fullmatch(value) is not None
            and not value.rstrip(".").rpartition(".")[2].isdigit())


def require_region(value: str, source: str) -> str:
    """A region named outside the file (an environment variable, the AWS profile), held to
    what aws.region takes: botocore takes 'x' or 'US-EAST-1' and sends requests to a host
    that does not exist, a failure no retry mends."""
    try:
        return msgspec.convert(value, Region)
    except msgspec.ValidationError:
        raise ConfigError(f"{source} {_text_problem(value, REGION_DESCRIPTION)} (set a region "
                          "such as us-east-1, or unset it)") from None


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
            if nested(_real(first.path), _real(second.path)):
                raise ConfigError(f"{pair} watch the same files ({first.path} and "
                                  f"{second.path}): list each directory once, none inside another")


def _refuse_own_files_in_watches(config: Config) -> None:
    """Invariant: spotwatch's own files are never checkpoints. A state directory inside a
    watched one would upload its ledger after every upload, forever, and a notice file there
    would be restored as the newest checkpoint set."""
    own = [("state.dir", config.state_dir)]
    if config.hooks.notice_file is not None:
        own.append(("hooks.notice_file", config.hooks.notice_file))
    for key, path in own:
        real = _real(path)
        for index, watch in enumerate(config.watch):
            root = _real(watch.path)
            if at_or_below(real, root):
                raise ConfigError(f"config key '{key}' ({path}) is inside watch[{index}] "
                                  f"({watch.path}): keep spotwatch's own files out of it")


def _refuse_state_dir_not_directory(path: Path) -> None:
    """Invariant: state.dir, or the nearest of its parents that exists, is a directory. A
    file there is a mistake no retry mends: refused as a config error (exit 2, which the
    systemd unit does not restart on), never a runtime failure every verb meets its own way.
    A missing one is made when first needed; one that cannot be looked at is left to the
    verb that uses it."""
    found = _nearest_existing(path)
    if found is not None and not stat.S_ISDIR(found[1]):
        where = "" if found[0] == path else f" ({found[0]} is not a directory)"
        raise ConfigError(f"config key 'state.dir' ({path}) is not a directory{where}")


# File systems that are the kernel's interfaces, not storage: root may pass access() there,
# yet nothing made there keeps state (a file under /proc cannot even be made).
KERNEL_FILE_SYSTEMS = frozenset({
    "proc", "sysfs", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "configfs",
    "pstore", "bpf", "efivarfs", "devpts", "binfmt_misc", "fusectl", "mqueue"})


def _refuse_state_dir_on_kernel_fs(path: Path) -> None:
    """Invariant: state.dir is not on a kernel file system. Refused at load, as a directory
    that is a file is, so that `check` and `run` say the same line and exit 2; `run` would
    otherwise fail at its first write in a way that depends on the file system and the uid."""
    found = _nearest_existing(path)
    if found is None:
        return
    fs_type = file_system_type(Path(os.path.realpath(found[0])))
    if fs_type in KERNEL_FILE_SYSTEMS:
        raise ConfigError(f"config key 'state.dir' ({path}) is on a {fs_type} file system, "
                          "which cannot keep state: set state.dir to a directory on a disk")


def require_notice_file_place(config: Config) -> None:
    """Invariant 7 needs the notice file written when the notice comes: a directory at
    hooks.notice_file (`/run/spotwatch` for `/run/spotwatch/notice.json`), or a file where
    one of its parents should be, would leave the trainer untold of every notice. Refused as
    a config error by the commands that tell the trainer (`run`) or check for it (`check`);
    `status` still reads a running daemon's report. One that appears later degrades status
    (NoticeHooks.degraded_reason)."""
    path = config.hooks.notice_file
    if path is None:
        return
    found = _nearest_existing(path)
    if found is None:
        return
    where, mode = found
    if where == path and stat.S_ISDIR(mode):
        raise ConfigError(f"config key 'hooks.notice_file' ({path}) is a directory: name the "
                          f"file to write, such as {path / 'notice.json'}")
    if where != path and not stat.S_ISDIR(mode):
        raise ConfigError(f"config key 'hooks.notice_file' ({path}) cannot be made: {where} "
                          "is not a directory")


def _nearest_existing(path: Path) -> tuple[Path, int] | None:
    """The path or the nearest of its parents that exists, with its mode (following links);
    None when none can be looked at."""
    for candidate in (path, *path.parents):
        try:
            return candidate, os.stat(candidate).st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            return None
    return None


def at_or_below(path: Path, root: Path) -> bool:
    """Whether path is root or below it (both resolved, or both as given)."""
    return path == root or root in path.parents


def nested(first: Path, second: Path) -> bool:
    """Whether either directory is the other or inside it: two watch entries that would
    watch the same files."""
    return at_or_below(first, second) or at_or_below(second, first)


def _real(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:
        raise ConfigError(f"watch path {path} cannot be resolved: {exc}") from None


def require_watch_dirs(config: Config) -> None:
    """A watched path must be a directory, or not there yet: the daemon watches for it
    (watch_dir_missing) and uploads its files once it is made.

    Invariant: one watched directory missing at the start (the trainer makes it later, a
    volume not mounted yet) does not keep the daemon from protecting the others, as it does
    not once it runs; a file where a directory is configured is a mistake, refused."""
    for watch in config.watch:
        try:
            found = os.stat(watch.path)
        except FileNotFoundError:
            continue
        except OSError as exc:  # e.g. a name too long for the file system
            raise ConfigError(f"watch directory {watch.path}: {exc.strerror}") from None
        if not stat.S_ISDIR(found.st_mode):
            raise ConfigError(f"watch directory is not a directory: {watch.path}")
