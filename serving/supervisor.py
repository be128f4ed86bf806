"""What the launcher needs to keep one vLLM instance without leaving anything behind: vLLM's processes as one
group that is always ended whole, the wait between restarts, and which start-up failures a restart cannot fix.

vLLM's API server starts a `VLLM::EngineCore` process, which starts a `VLLM::Worker` (on a CPU the worker may run
inside it: engine.cpu_worker_in_engine). A SIGKILL of the API server alone leaves them running as orphans, holding
their memory (3.4 GB on the tiny default; on a GPU, the GPU's memory, so the next vLLM fails to start). So vLLM runs
in its own session, whose process group every child inherits, and is ended as that whole group: SIGTERM, SIGKILL
after a grace period, then a wait until no process of it is left. Processes are found by their group in /proc
(Linux: vLLM runs nowhere else). Python's multiprocessing resource tracker, one of vLLM's processes, ignores SIGTERM
by design and, once the processes it tracks are gone, removes the shared memory they left in /dev/shm (250 MB on the
tiny default); so SIGKILL spares it while it can.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from serving.adapters import AdapterError, AdapterInfo, adapter_fingerprint

log = logging.getLogger(__name__)

# Seconds between two looks at the group while waiting for it to end, and how long a SIGKILL may take to end it.
_WAIT_POLL_S = 0.1
_KILL_WAIT_S = 30.0

# Start-up failures a restart cannot fix, as the error lines of vLLM's log show them: (pattern, what it means).
PERMANENT_CAUSES = (
    (re.compile(r"out of memory|OutOfMemoryError|Cannot allocate memory|MemoryError|No available memory for the "
                r"cache blocks|larger than the available KV cache memory", re.IGNORECASE), "out of memory"),
    (re.compile(r"LoRA"), "an adapter vLLM cannot load"),
)


class GroupSurvived(RuntimeError):
    """Processes of vLLM's group outlived SIGKILL (stuck in the kernel); the message lists them."""


def describe_exit(code: int) -> str:
    """A process's exit status in words: 'code 1', or 'killed by SIGKILL'."""
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"code {code}"


def restart_delay(failed: int, base_s: float, cap_s: float) -> float:
    """Seconds to wait before a restart after `failed` failed restarts in the same outage: base_s, doubled per
    failure, at most cap_s (exponential back-off: a restart that keeps failing does not spin)."""
    return min(cap_s, base_s * 2 ** failed)


def _error_lines(log_text: str) -> list[str]:
    return [line.strip() for line in log_text.splitlines() if re.search(r"Error|error|ERROR|Exception", line)]


def last_error(log_text: str) -> str | None:
    """The last error line of vLLM's log (its traceback ends with the exception), None if it has none."""
    lines = _error_lines(log_text)
    return lines[-1] if lines else None


def permanent_cause(log_text: str) -> str | None:
    """What makes a start-up failure one a restart cannot fix (out of memory, an adapter vLLM cannot load), read
    from the error lines of vLLM's log; None when nothing says so."""
    errors = "\n".join(_error_lines(log_text))
    return next((meaning for pattern, meaning in PERMANENT_CAUSES if pattern.search(errors)), None)


def check_unchanged(adapters: list[AdapterInfo]) -> None:
    """AdapterError naming every adapter whose folder is gone or whose files changed since it was checked: vLLM
    would fail to load it, or serve another version under the old one's name, on every restart."""
    problems = []
    for adapter in adapters:
        if not adapter.path.is_dir():
            problems.append(f"{adapter.name}: the adapter folder {adapter.path} is gone")
        elif adapter_fingerprint(adapter.path) != adapter.fingerprint:
            problems.append(f"{adapter.name}: the adapter at {adapter.path} changed since it was loaded (version "
                            f"{adapter.fingerprint}, now {adapter_fingerprint(adapter.path)}); restore it")
    if problems:
        raise AdapterError(problems)


def group_members(pgid: int) -> list[int]:
    """The pids of the live processes in process group `pgid`. Zombies are left out: they hold no memory, and their
    parent (this process for vLLM's API server, init for orphans) reaps them."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # it ended meanwhile
            continue
        # After the command name (in parentheses, which may hold spaces): state, parent pid, process group.
        state, _parent, group = stat.rpartition(")")[2].split()[:3]
        if int(group) == pgid and state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _is_resource_tracker(pid: int) -> bool:
    try:
        return b"multiprocessing.resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class ProcessGroup:
    """One command started in its own session and process group, with its output appended to `log_path`; every
    process it starts is in the group too, and end() ends them all."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # Where this instance's lines start in a log earlier instances appended to too.
        self.log_offset = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as log_file:
            self.process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        self.pgid = self.process.pid  # a session leader leads its process group too
        # Set once the group is seen empty: its number may then be reused by another group, never to be signalled.
        self._ended = False

    def returncode(self) -> int | None:
        """The group leader's exit status, None while it runs (reaps it once it exited)."""
        return self.process.poll()

    def members(self) -> list[int]:
        if self._ended:
            return []
        self.process.poll()  # reap the leader, so that it does not linger as a zombie of ours
        members = group_members(self.pgid)
        self._ended = not members
        return members

    def log(self) -> str:
        """What this instance wrote to the log."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self.log_offset)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def end(self, grace_s: float) -> None:
        """SIGTERM to the whole group, SIGKILL to what is left of it after `grace_s`, and return once no process of
        it is left (GroupSurvived if some outlive SIGKILL too). Safe to call again, and from any thread."""
        if not self._signal(signal.SIGTERM):
            return
        if self._wait_empty(grace_s):
            return
        log.warning("vLLM's processes %s did not end within %.0f s of SIGTERM; sending SIGKILL", self.members(),
                    grace_s)
        for pid in self.members():
            if not _is_resource_tracker(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self._wait_empty(_KILL_WAIT_S):
            return
        # A resource tracker that did not exit by itself, or a process stuck in the kernel.
        if self._signal(signal.SIGKILL) and not self._wait_empty(_KILL_WAIT_S):
            raise GroupSurvived(f"vLLM's processes {self.members()} (process group {self.pgid}) are still there "
                                f"{_KILL_WAIT_S:.0f} s after SIGKILL")

    def _signal(self, sig: signal.Signals) -> bool:
        """Send `sig` to the group; False when no process of it is left."""
        if not self.members():
            return False
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            return False
        return True

    def _wait_empty(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.members():
            if time.monotonic() >= deadline:
                return False
            time.sleep(_WAIT_POLL_S)
        return True
