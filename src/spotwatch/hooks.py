"""Telling training code about a notice: a notice file, a signal, a command."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import structlog

from spotwatch.config import HookSettings
from spotwatch.state import write_json_atomically

log = structlog.get_logger("spotwatch.hooks")


class NoticeHooks:
    def __init__(self, settings: HookSettings, default_notice_file: Path) -> None:
        self.notice_file = settings.notice_file or default_notice_file
        self._settings = settings

    def clear(self) -> None:
        """A notice file left from an earlier life of the instance means nothing now."""
        self.notice_file.unlink(missing_ok=True)

    def fire(self, notice: dict[str, Any]) -> None:
        self._write_notice_file(notice)
        if self._settings.signal and self._settings.pid_file:
            self._signal_trainer(self._settings.signal, self._settings.pid_file)
        if self._settings.command:
            self._run_command(self._settings.command, notice)

    def _write_notice_file(self, notice: dict[str, Any]) -> None:
        try:
            write_json_atomically(self.notice_file, notice)
        except OSError as exc:
            log.warning("hook_failed", hook="notice_file", path=str(self.notice_file),
                        error=exc.strerror)

    def _signal_trainer(self, name: str, pid_file: Path) -> None:
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.Signals[name])
        except (OSError, ValueError, IndexError) as exc:
            log.warning("hook_failed", hook="signal", pid_file=str(pid_file), error=str(exc))
            return
        log.info("hook_signal_sent", signal=name, pid=pid)

    def _run_command(self, command: str, notice: dict[str, Any]) -> None:
        env = dict(os.environ)
        env.update({f"SPOTWATCH_NOTICE_{key.upper()}": str(value or "")
                    for key, value in notice.items()})
        env["SPOTWATCH_NOTICE_FILE"] = str(self.notice_file)
        try:
            process = subprocess.Popen(["/bin/sh", "-c", command], env=env,
                                       stdin=subprocess.DEVNULL)
        except OSError as exc:
            log.warning("hook_failed", hook="command", error=exc.strerror)
            return
        log.info("hook_command_started", pid=process.pid)

        def reap() -> None:  # the flush must not wait for the command
            log.info("hook_command_done", pid=process.pid, exit_code=process.wait())

        threading.Thread(target=reap, name="hook-command", daemon=True).start()
