"""The running daemon: its loop (notices, flushes, shutdown), notice hooks, metrics and
health endpoint, systemd keep-alives, and pruning off the loop."""
