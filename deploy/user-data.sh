#!/usr/bin/env bash
# EC2 user-data (cloud-init runs it as root at first boot): installs spotwatch, writes its
# config and environment file, optionally restores the newest checkpoint, then enables and
# starts the systemd service before training begins.
#
# Needs Python 3.11 or newer with venv: python3 where it is that recent (Debian bookworm and
# newer, Ubuntu 24.04), else python3.11, which it installs with apt or dnf if missing (Ubuntu
# 22.04, Amazon Linux 2023).
#
# Settings, as environment variables or edited here:
#   SPOTWATCH_BUCKET          checkpoint bucket (required)
#   SPOTWATCH_REGION          bucket region; default: the instance's region from IMDS
#   SPOTWATCH_CHECKPOINT_DIR  directory the trainer writes (default /opt/ml/checkpoints)
#   SPOTWATCH_PREFIX          key prefix (default checkpoints/)
#   SPOTWATCH_PACKAGE         what pip installs (default spotwatch; a wheel path works too)
#   SPOTWATCH_PIP_ARGS        extra pip arguments
#   SPOTWATCH_RESTORE         yes: download the newest complete checkpoint first (if there is
#                             none yet, or the restore fails, spotwatch starts all the same)
#   SPOTWATCH_TRAINER_USER    the user the trainer runs as (e.g. ubuntu): owns the checkpoint
#                             directory and what the restore put there (default: root's)
#   DESTDIR                   install below this root instead of / (nothing is started)
set -euo pipefail

SPOTWATCH_BUCKET="${SPOTWATCH_BUCKET:-}"
SPOTWATCH_REGION="${SPOTWATCH_REGION:-}"
SPOTWATCH_CHECKPOINT_DIR="${SPOTWATCH_CHECKPOINT_DIR:-/opt/ml/checkpoints}"
SPOTWATCH_PREFIX="${SPOTWATCH_PREFIX:-checkpoints/}"
SPOTWATCH_PACKAGE="${SPOTWATCH_PACKAGE:-spotwatch}"
SPOTWATCH_PIP_ARGS="${SPOTWATCH_PIP_ARGS:-}"
SPOTWATCH_RESTORE="${SPOTWATCH_RESTORE:-no}"
SPOTWATCH_TRAINER_USER="${SPOTWATCH_TRAINER_USER:-}"
# As the AWS SDKs and spotwatch itself: the endpoint if given, else by the endpoint mode.
case "${AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE:-IPv4}" in
    [Ii][Pp][Vv]6) IMDS_ENDPOINT="http://[fd00:ec2::254]" ;;
    *) IMDS_ENDPOINT="http://169.254.169.254" ;;
esac
IMDS_ENDPOINT="${AWS_EC2_METADATA_SERVICE_ENDPOINT:-$IMDS_ENDPOINT}"
IMDS_ENDPOINT="${IMDS_ENDPOINT%/}"
DESTDIR="${DESTDIR:-}"
PYTHON=""

PREFIX_DIR=/opt/spotwatch
CONFIG_DIR=/etc/spotwatch
UNIT_DIR=/etc/systemd/system

log() { printf 'spotwatch user-data: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ -n "$SPOTWATCH_BUCKET" ] || die "set SPOTWATCH_BUCKET to the checkpoint bucket"
if [ -n "$SPOTWATCH_TRAINER_USER" ] && ! id -u "$SPOTWATCH_TRAINER_USER" >/dev/null 2>&1; then
    die "SPOTWATCH_TRAINER_USER: no user $SPOTWATCH_TRAINER_USER"
fi

instance_region() {
    local token
    token=$(curl -fsS -m 2 -X PUT "$IMDS_ENDPOINT/latest/api/token" \
        -H "X-aws-ec2-metadata-token-ttl-seconds: 60") || return 1
    curl -fsS -m 2 -H "X-aws-ec2-metadata-token: $token" \
        "$IMDS_ENDPOINT/latest/meta-data/placement/region"
}

if [ -z "$SPOTWATCH_REGION" ]; then
    SPOTWATCH_REGION=$(instance_region) \
        || die "cannot read the region from IMDS at $IMDS_ENDPOINT; set SPOTWATCH_REGION"
fi

# watchdog>=7.1, whose inotify overflow report sync.tracker's rescan relies on, needs Python
# 3.11: older distributions (Ubuntu 22.04, Amazon Linux 2023) have it beside python3, by name.
PYTHON_CANDIDATES="python3 python3.13 python3.12 python3.11"

recent_python() {
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
}

# Debian and Ubuntu ship the venv module with python3 but ensurepip, without which no venv can be
# made, only in python3-venv (python3.11-venv): a candidate must import both.
usable_python() {
    recent_python "$1" && "$1" -c 'import ensurepip, venv' >/dev/null 2>&1
}

# Sets PYTHON to the first usable candidate on PATH.
find_python() {
    local candidate
    for candidate in $PYTHON_CANDIDATES; do
        if command -v "$candidate" >/dev/null && usable_python "$candidate"; then
            PYTHON=$(command -v "$candidate")
            return 0
        fi
    done
    return 1
}

python3_version() {
    python3 -c 'import sys; print("python3 %d.%d.%d" % sys.version_info[:3])' 2>/dev/null \
        || echo none
}

ensure_python() {
    find_python && return
    if [ -z "$DESTDIR" ]; then
        # A failed install still ends in the one-line error below, not in the package manager's.
        if command -v apt-get >/dev/null; then
            local packages=python3-venv
            if command -v python3 >/dev/null && ! recent_python python3; then
                packages="python3.11 python3.11-venv"
            fi
            # shellcheck disable=SC2086 # two package names, when there are two
            { apt-get update -q && apt-get install -y -q $packages; } \
                || log "could not install $packages"
        elif command -v dnf >/dev/null; then
            dnf install -y -q python3.11 || log "could not install python3.11"
        fi
    fi
    find_python \
        || die "Python 3.11 or newer with venv is required (found: $(python3_version))"
}

install_package() {
    local venv="$DESTDIR$PREFIX_DIR"
    ensure_python
    log "installing $SPOTWATCH_PACKAGE into $venv"
    "$PYTHON" -m venv "$venv"
    # shellcheck disable=SC2086 # SPOTWATCH_PIP_ARGS is a list of words on purpose
    "$venv/bin/pip" install -q --disable-pip-version-check $SPOTWATCH_PIP_ARGS "$SPOTWATCH_PACKAGE"
    mkdir -p "$DESTDIR/usr/local/bin"
    ln -sf "$PREFIX_DIR/bin/spotwatch" "$DESTDIR/usr/local/bin/spotwatch"
}

# A YAML single-quoted scalar: the value exactly, whatever it holds (a '#' would start a
# comment, a ': ' a mapping, a leading '*' an alias in a plain one).
yaml_quote() {
    local quote="'"
    printf "'%s'" "${1//$quote/$quote$quote}"
}

# Moves the file written ($1) to $2. An earlier file there that says something else (an
# operator's edits, a run with other settings) is kept beside it, named by the time, and
# said: a rerun never drops an edited config without a word.
put_in_place() {
    local written="$1" target="$2" kept
    if [ -e "$target" ] && [ "$(cat "$target")" != "$(cat "$written")" ]; then
        kept="$target.replaced-$(date -u +%Y%m%dT%H%M%SZ)"
        mv "$target" "$kept"
        log "$target held other settings: replaced, the earlier one kept as $kept"
    fi
    mv "$written" "$target"
}

write_config() {
    local dir="$DESTDIR$CONFIG_DIR"
    mkdir -p "$dir" "$DESTDIR$SPOTWATCH_CHECKPOINT_DIR"
    cat >"$dir/.config.yaml.new" <<EOF
aws:
  region: $(yaml_quote "$SPOTWATCH_REGION")
watch:
  - path: $(yaml_quote "$SPOTWATCH_CHECKPOINT_DIR")
    prefix: $(yaml_quote "$SPOTWATCH_PREFIX")
sync:
  mode: continuous
EOF
    put_in_place "$dir/.config.yaml.new" "$dir/config.yaml"
    (
        umask 077
        printf 'S3_BUCKET_NAME=%s\n' "$SPOTWATCH_BUCKET" >"$dir/.spotwatch.env.new"
    )
    put_in_place "$dir/.spotwatch.env.new" "$dir/spotwatch.env"
}

install_unit() {
    local unit="$DESTDIR$UNIT_DIR/spotwatch.service"
    mkdir -p "$DESTDIR$UNIT_DIR"
    # The unit ships inside the package, so it always matches the installed version.
    "$DESTDIR$PREFIX_DIR/bin/python" - "$unit" <<'EOF'
import sys
from importlib.resources import files
with open(sys.argv[1], "w") as out:
    out.write(files("spotwatch").joinpath("data/spotwatch.service").read_text())
EOF
}

restore_checkpoint() {
    [ "$SPOTWATCH_RESTORE" = yes ] || return 0
    if [ -n "$DESTDIR" ]; then
        log "DESTDIR set: skipping restore"
        return 0
    fi
    log "restoring the newest checkpoint into $SPOTWATCH_CHECKPOINT_DIR"
    # A job's first instance finds no checkpoint yet; no failed restore may leave the instance
    # unprotected: spotwatch starts either way.
    # By its full path: the PATH of `sudo` (secure_path on Amazon Linux, RHEL) has no
    # /usr/local/bin, and a restore not found would start training from scratch.
    if ! S3_BUCKET_NAME="$SPOTWATCH_BUCKET" "$PREFIX_DIR/bin/spotwatch" restore \
        -c "$CONFIG_DIR/config.yaml" \
        --to "$SPOTWATCH_CHECKPOINT_DIR"; then
        log "nothing restored (see above); starting spotwatch anyway"
    fi
}

hand_to_trainer() {
    [ -n "$SPOTWATCH_TRAINER_USER" ] || return 0
    # Made (and restored into) by root: a trainer of another user could neither write its
    # checkpoints there nor rotate the restored ones away.
    chown -R "$SPOTWATCH_TRAINER_USER": "$DESTDIR$SPOTWATCH_CHECKPOINT_DIR"
}

enable_service() {
    if [ -n "$DESTDIR" ]; then
        systemctl --root="$DESTDIR" enable spotwatch.service
        return
    fi
    systemctl daemon-reload
    systemctl enable spotwatch.service
    # Started, or restarted when it runs already (the script run again on an instance): a
    # running daemon would go on with the settings it read at its start. Its stop flushes.
    systemctl restart spotwatch.service
}

install_package
write_config
install_unit
restore_checkpoint
hand_to_trainer
enable_service
log "spotwatch is watching $SPOTWATCH_CHECKPOINT_DIR -> s3://$SPOTWATCH_BUCKET/$SPOTWATCH_PREFIX"
