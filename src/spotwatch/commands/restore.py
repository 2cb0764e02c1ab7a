"""`spotwatch restore`: the restore itself is spotwatch.sync.restore; this reports it."""

from __future__ import annotations

import argparse

from spotwatch.commands import load
from spotwatch.sync.restore import restore


def run(args: argparse.Namespace) -> int:
    config, bucket = load(args, need_watch_dirs=False)
    report = restore(config, bucket, args.to, args.set_name, args.prefix)
    passed_over = (f"; newer sets passed over: {', '.join(report.passed_over)}"
                   if report.passed_over else "")
    print(f"restored {report.set_name} into {report.destination}: {report.downloaded} files "
          f"downloaded ({report.bytes / 2**20:.1f} MiB), {report.skipped} already present"
          f"{passed_over}")
    return 0
