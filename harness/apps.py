"""Apps in a process of their own: one Writer per instance, as Cloud Foundry runs apps
apart from the broker.

Run in the broker's process, twenty busy clients share its interpreter lock with the
failovers they measure, which no deployment does (measured with 20 instances and
10 failovers at once: decision to first write p50 2.7 s in one process).

The parent (`Apps`) speaks to the child (`python -m harness.apps`) in JSON lines:
the credentials first, then `wait_acks` and `wait_recovery` requests, then `stop`,
answered with every writer's log. Times are CLOCK_MONOTONIC, the same in both
processes. The child stops its writers when its stdin closes, so a parent that dies
leaves nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

from harness.writer import WriteLog, Writer

ROOT = Path(__file__).resolve().parent.parent


class Apps:
    """The writers of many instances, in a child process; `stop()` returns their logs."""

    def __init__(self, credentials: dict[str, dict[str, Any]], *, pause: float = 0.005,
                 retry_pause: float = 0.005) -> None:
        """`pause`: between two acknowledged writes of one writer; `retry_pause`: after a
        failed one (how finely the return of writes is timed)."""
        self._proc = subprocess.Popen([sys.executable, "-m", "harness.apps"], cwd=ROOT,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True)
        self._send({"credentials": credentials, "pause": pause, "retry_pause": retry_pause})
        self._answer()  # every writer started

    def _send(self, message: dict[str, Any]) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(message) + "\n")
        self._proc.stdin.flush()

    def _answer(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the apps' process ended (exit {self._proc.wait()})")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise AssertionError(answer["error"])
        return answer

    def wait_acks(self, count: int, after: float, timeout: float = 60.0) -> None:
        """Until every writer had `count` writes acknowledged after `after`."""
        self._send({"wait_acks": count, "after": after, "timeout": timeout})
        self._answer()

    def wait_recovery(self, instance_ids: list[str], fault_at: float,
                      timeout: float = 300.0) -> dict[str, float]:
        """Until each of these instances' writers wrote again after the outage the fault
        caused; returns when (Writer.recovered_at). The caller's process just waits on a
        pipe meanwhile: it takes no CPU from the failovers it measures."""
        self._send({"wait_recovery": instance_ids, "fault_at": fault_at, "timeout": timeout})
        return {i: float(t) for i, t in self._answer()["recovered"].items()}

    def stop(self) -> dict[str, WriteLog]:
        if self._proc.poll() is not None:
            return {}
        self._send({"stop": True})
        logs = self._answer()["logs"]
        self._proc.wait(timeout=30)
        return {i: WriteLog([(int(n), float(t)) for n, t in log["acked"]],
                            [(float(t), str(e)) for t, e in log["errors"]])
                for i, log in logs.items()}

    def close(self) -> None:
        """Stop the child if `stop()` was not reached (an error on the way)."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)


def serve(stdin: IO[str], stdout: IO[str]) -> None:
    """The child: start the writers, answer requests until `stop` or the end of stdin."""
    def answer(message: dict[str, Any]) -> None:
        stdout.write(json.dumps(message) + "\n")
        stdout.flush()

    first = json.loads(stdin.readline())
    writers = {i: Writer(creds, pause=first["pause"], retry_pause=first["retry_pause"])
               for i, creds in first["credentials"].items()}
    for w in writers.values():
        w.start()
    answer({"started": len(writers)})
    for line in stdin:
        request = json.loads(line)
        if "wait_acks" in request:
            try:
                for w in writers.values():
                    w.wait_acks(request["wait_acks"], after=request["after"],
                                timeout=request["timeout"])
            except AssertionError as exc:
                answer({"error": str(exc)})
                continue
            answer({"ok": True})
        elif "wait_recovery" in request:
            try:
                answer({"recovered": {
                    i: writers[i].wait_recovery(request["fault_at"], request["timeout"])
                    for i in request["wait_recovery"]}})
            except AssertionError as exc:
                answer({"error": str(exc)})
        elif "stop" in request:
            break
    for w in writers.values():
        w.stop()
    answer({"logs": {i: {"acked": w.acked, "errors": w.errors}
                     for i, w in writers.items()}})


if __name__ == "__main__":
    serve(sys.stdin, sys.stdout)
