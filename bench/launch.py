"""Runs one command and reports its own resource use: `launch.py FD COMMAND...`.

A child's peak RSS as the kernel keeps it (ru_maxrss) includes the memory of the process it
was forked from, since the high-water mark survives exec: a tool started straight from the
benchmark (a Python process holding boto3) would show the benchmark's size. Started from this
small process instead, it carries about 8 MiB of it at most. Writes "seconds cpu_seconds
maxrss_kib" to file descriptor FD and exits with the command's status. Run it as
`python -I -S`, so that it starts small and imports nothing but the standard library.
"""

from __future__ import annotations

import os
import sys
import time


def main() -> int:
    report_fd, argv = int(sys.argv[1]), sys.argv[2:]
    start = time.perf_counter()
    pid = os.posix_spawnp(argv[0], argv, os.environ)
    _, status, usage = os.wait4(pid, 0)  # the child with every descendant it waited for
    seconds = time.perf_counter() - start
    with os.fdopen(report_fd, "w") as report:
        report.write(f"{seconds} {usage.ru_utime + usage.ru_stime} {usage.ru_maxrss}\n")
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
