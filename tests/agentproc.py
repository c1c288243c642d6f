"""Run the real `kipfix agent` as a process, the way an operator does."""

from __future__ import annotations

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
        self.proc: subprocess.Popen | None = None

    def write_config(self, config: dict) -> None:
        self.config_path.write_text(yaml.safe_dump(config))

    def start(self) -> "AgentProcess":
        cmd = [KIPFIX, "--log-level", "debug", "agent", "--config", str(self.config_path)]
        if self.keep_attached:
            cmd.append("--keep-attached")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        self.wait_log("kipfix agent running", timeout=60)
        return self

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

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
        ids = f"/run/kipfix/netns-ids{self.pin_path.replace('/', '_')}.json"
        if os.path.exists(ids):
            os.unlink(ids)


def totals(records, **match) -> tuple[int, int]:
    """(packets, octets) summed over records whose fields equal ``match``."""
    packets = octets = 0
    for record in records:
        if all(record.get(k) == v for k, v in match.items()):
            packets += record["packets"]
            octets += record["octets"]
    return packets, octets
