"""The fixed start-up cost of a CLI command that talks to S3, before its first request.

Each round is a fresh process that times (wall clock and CPU) three steps: importing the
`restore` command and configuring logging as the CLI does, making the S3 client, and making
the store (default
settings, the CRT's client); medians over the rounds are printed. No request is sent: the
endpoint is a closed port and the credentials are dummies.

    python bench/startup.py [--rounds 15] [--src DIR ...] [--json]

Each --src is a spotwatch source tree (its src directory) put first on the path, to compare
checkouts: their rounds alternate, so a busy machine slows each alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

STEPS = ("import", "client", "store")
# Runs in each fresh process: one line of JSON, {step: [wall seconds, CPU seconds]}, the
# store's class and where spotwatch was imported from.
PROBE = """
import json, resource, time

def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

marks = [(time.perf_counter(), cpu())]
import spotwatch.cli
spotwatch.cli._command("restore")
from spotwatch.logs import configure_logging
configure_logging("info", "json")  # as every command does once its config is read
marks.append((time.perf_counter(), cpu()))
from spotwatch.aws.crt_store import make_store
from spotwatch.aws.s3 import make_s3_client
from spotwatch.config import TransferSettings
# The CRT's store, as `auto` makes it for a restore (and, for uploads, where no other
# spotwatch process on the host holds the CRT's lock).
settings = TransferSettings(client="crt")
client = make_s3_client("us-east-1", settings)
marks.append((time.perf_counter(), cpu()))
store = make_store(client, "bucket", settings)
marks.append((time.perf_counter(), cpu()))
store.close()
steps = ("import", "client", "store")
timings = {step: [marks[i + 1][0] - marks[i][0], marks[i + 1][1] - marks[i][1]]
           for i, step in enumerate(steps)}
print(json.dumps({**timings, "made": type(store).__name__, "from": spotwatch.__file__}))
"""


def one_round(src: str | None) -> dict[str, Any]:
    env = dict(os.environ, AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="dummy",
               AWS_SECRET_ACCESS_KEY="dummy", AWS_DEFAULT_REGION="us-east-1")
    # As from an installed package, spotwatch's own modules load from bytecode (written by the
    # warm-up round), not compiled afresh in every process.
    for name in ("AWS_PROFILE", "AWS_DATA_PATH", "AWS_ENDPOINT_URL_S3", "PYTHONDONTWRITEBYTECODE",
                 "PYTHONPATH"):
        env.pop(name, None)
    if src is not None:
        env["PYTHONPATH"] = src
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def medians(rounds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    found = {step: {"wall_ms": 1000 * statistics.median(r[step][0] for r in rounds),
                    "cpu_ms": 1000 * statistics.median(r[step][1] for r in rounds)}
             for step in STEPS}
    found["total"] = {
        "wall_ms": 1000 * statistics.median(sum(r[s][0] for s in STEPS) for r in rounds),
        "cpu_ms": 1000 * statistics.median(sum(r[s][1] for s in STEPS) for r in rounds)}
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--src", action="append", help="a spotwatch src directory to time "
                        "(repeatable; default: the installed spotwatch)")
    parser.add_argument("--json", action="store_true", help="print the medians as JSON")
    args = parser.parse_args()
    sources: list[str | None] = [os.path.abspath(src) for src in args.src or []] or [None]
    for src in sources:
        one_round(src)  # warm-up: bytecode written, files in the page cache
    rounds: dict[str | None, list[dict[str, Any]]] = {src: [] for src in sources}
    for _ in range(args.rounds):
        for src in sources:
            rounds[src].append(one_round(src))
    report: dict[str, dict[str, Any]] = {}
    for src, results in rounds.items():
        report[str(src or "installed")] = {
            "from": sorted({r["from"] for r in results}),
            "made": sorted({r["made"] for r in results}), **medians(results)}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    for name, found in report.items():
        print(f"{name}: medians of {args.rounds} fresh processes "
              f"(spotwatch from {', '.join(found['from'])}; store: {', '.join(found['made'])})")
        for step in (*STEPS, "total"):
            print(f"  {step:7s} {found[step]['wall_ms']:7.1f} ms wall "
                  f"{found[step]['cpu_ms']:7.1f} ms CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
