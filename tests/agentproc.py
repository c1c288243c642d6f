"""Run the real `kipfix agent` as a process, the way an operator does."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml

KIPFIX = str(Path(sys.executable).with_name("kipfix"))
CRASHPOINT = str(Path(__file__).with_name("crashpoint.py"))


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class AgentProcess:
    """`kipfix agent --config FILE` with JSON-lines output in a temp dir."""

    def __init__(self, tmp_path: Path, config: dict, pin_path: str | None = None, keep_attached: bool = False):
        self.tmp_path = tmp_path
        self.pin_path = pin_path or f"/sys/fs/bpf/kipfix-test-{uuid.uuid4().hex[:8]}"
        self.config = {"drainInterval": 0.2, "jsonLines": str(tmp_path / "flows.jsonl"),
                       "pinPath": self.pin_path, **config}
        self.config_path = tmp_path / "kipfix.yaml"
        self.write_config(self.config)
        self.keep_attached = keep_attached
        self.log_path = tmp_path / f"agent-{uuid.uuid4().hex[:4]}.log"
        self.log_paths: list[Path] = []  # every run's log, oldest first
        self.proc: subprocess.Popen | None = None

    def write_config(self, config: dict) -> None:
        self.config_path.write_text(yaml.safe_dump(config))

    def start(self, crash: tuple[str, int] | None = None, wait: bool = True) -> "AgentProcess":
        """Start the agent (a new log file each time); ``crash``: (point, n) of tests/crashpoint.py."""
        args = ["--log-level", "debug", "agent", "--config", str(self.config_path)]
        if self.keep_attached:
            args.append("--keep-attached")
        cmd = [KIPFIX, *args] if crash is None else [sys.executable, CRASHPOINT, crash[0], str(crash[1]), *args]
        self.log_path = self.tmp_path / f"agent-{uuid.uuid4().hex[:4]}.log"
        self.log_paths.append(self.log_path)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_log("kipfix agent running", timeout=60)
        return self

    def kill(self) -> None:
        """SIGKILL, as an OOM kill or kill -9 would: nothing of the agent runs after it."""
        self.proc.kill()
        self.proc.wait()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def all_logs(self) -> str:
        return "".join(path.read_text() for path in self.log_paths if path.exists())

    def wait_log(self, text: str, timeout: float = 10) -> None:
        def seen():
            if self.proc is not None and self.proc.poll() is not None and text not in self.log():
                raise AssertionError(f"agent exited with {self.proc.returncode} before logging {text!r}:\n"
                                     + self.log())
            return text in self.log()
        wait_for(seen, timeout, f"agent log line {text!r}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def records(self) -> list[dict]:
        path = Path(self.config["jsonLines"])
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.pin_path, ignore_errors=True)
        remove_state_files(self.pin_path)


def remove_state_files(pin_path: str) -> None:
    """The netns ids and the journal an agent on ``pin_path`` left in /run/kipfix."""
    stem = pin_path.replace('/', '_')
    for path in [f"/run/kipfix/netns-ids{stem}.json", *glob.glob(f"/run/kipfix/journal{stem}-*")]:
        if os.path.exists(path):
            os.unlink(path)


def totals(records, **match) -> tuple[int, int]:
    """(packets, octets) summed over records whose fields equal ``match``."""
    packets = octets = 0
    for record in records:
        if all(record.get(k) == v for k, v in match.items()):
            packets += record["packets"]
            octets += record["octets"]
    return packets, octets
