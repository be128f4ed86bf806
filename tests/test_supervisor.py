"""serving.supervisor without vLLM: a process group is ended whole, orphans included; back-off, the causes a restart
cannot fix, and the settings that drive them."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from serving.adapters import AdapterError, AdapterInfo, adapter_fingerprint
from lora_router.deployment import ConfigError, GatewayConfig
from serving.supervisor import ProcessGroup, check_unchanged, last_error, permanent_cause, restart_delay

# A leader with two children, all of which ignore SIGTERM (as vLLM's orphaned engine core did): only SIGKILL ends them.
STUBBORN = ["sh", "-c", "trap '' TERM; sleep 600 & sleep 600 & wait"]
# A leader that exits 0 on SIGTERM, with a child that SIGTERM ends.
POLITE = ["sh", "-c", "trap 'exit 0' TERM; sleep 600 & wait"]


def _wait_members(group: ProcessGroup, count: int) -> list[int]:
    deadline = time.monotonic() + 10
    while len(members := group.members()) < count:
        assert time.monotonic() < deadline, f"the group has {members}, not {count} processes"
        time.sleep(0.02)
    return members


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_a_group_whose_leader_was_killed_alone_is_ended_orphans_and_all(tmp_path):
    group = ProcessGroup(STUBBORN, dict(os.environ), tmp_path / "log")
    members = _wait_members(group, 3)
    os.kill(group.process.pid, signal.SIGKILL)  # the leader alone, as a crash or the OOM killer would
    group.process.wait()
    orphans = [pid for pid in members if pid != group.process.pid]
    assert all(_alive(pid) for pid in orphans), "killing the leader alone should have left its children running"
    start = time.monotonic()
    group.end(grace_s=0.5)
    assert group.members() == [] and not any(_alive(pid) for pid in orphans)
    assert time.monotonic() - start < 10
    group.end(grace_s=0.5)  # again: nothing left to signal, returns at once


def test_a_group_that_stops_on_sigterm_is_not_killed(tmp_path):
    group = ProcessGroup(POLITE, dict(os.environ), tmp_path / "log")
    _wait_members(group, 2)
    start = time.monotonic()
    group.end(grace_s=20)
    assert group.members() == [] and group.returncode() == 0  # its own exit, not SIGKILL's
    assert time.monotonic() - start < 10


def test_killing_a_group_spares_the_resource_tracker_which_then_removes_the_shared_memory_left(tmp_path):
    script = ("import signal, time\n"
              "from multiprocessing import shared_memory\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "print(shared_memory.SharedMemory(create=True, size=1 << 20).name, flush=True)\n"
              "time.sleep(600)\n")
    group = ProcessGroup([sys.executable, "-c", script], dict(os.environ), tmp_path / "log")
    _wait_members(group, 2)  # the script and the resource tracker it started
    deadline = time.monotonic() + 10
    while not (name := group.log().strip()):
        assert time.monotonic() < deadline, "the script did not name its shared memory"
        time.sleep(0.02)
    segment = Path("/dev/shm") / name
    assert segment.is_file()
    group.end(grace_s=0.5)
    assert group.members() == [] and group.returncode() == -signal.SIGKILL
    assert not segment.exists(), "SIGKILL of the resource tracker left the shared memory in /dev/shm"


def test_the_log_of_one_instance_is_its_own(tmp_path):
    log = tmp_path / "vllm.log"
    log.write_text("an earlier instance's lines\n")
    group = ProcessGroup(["sh", "-c", "echo this instance"], dict(os.environ), log)
    group.process.wait()
    assert group.log() == "this instance\n"


def test_restarts_back_off_exponentially_up_to_the_cap():
    assert [restart_delay(n, 1.0, 30.0) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert restart_delay(3, 0.0, 30.0) == 0


@pytest.mark.parametrize("log_text, cause", [
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "out of memory"),
    ("ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization`",
     "out of memory"),
    ("vllm.lora.request.LoRAAdapterNotFoundError: Loading lora calendar@1 failed", "an adapter vLLM cannot load"),
    ("OSError: [Errno 98] Address already in use", None),
    ("INFO 12-03 [serving.py:180] Loaded new LoRA adapter: name 'calendar@1'", None),  # no error line
])
def test_a_start_up_failure_a_restart_cannot_fix_is_told_from_the_log(log_text, cause):
    assert permanent_cause(f"INFO starting\n{log_text}\nINFO done") == cause


def test_the_last_error_line_of_the_log_names_what_failed():
    text = "INFO starting\nTraceback (most recent call last):\n  File \"x.py\"\nOSError: [Errno 98] Address already in use\n"
    assert last_error(text) == "OSError: [Errno 98] Address already in use"
    assert last_error("INFO all well\n") is None


def test_adapters_gone_or_changed_since_loaded_are_all_named(tmp_path):
    infos = []
    for name in ("calendar", "claim-window", "provider-select"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"r": 8}))
        infos.append(AdapterInfo(name, folder, 8, adapter_fingerprint(folder)))
    check_unchanged(infos)
    (tmp_path / "calendar" / "adapter_config.json").write_text(json.dumps({"r": 16}))
    (tmp_path / "claim-window" / "adapter_config.json").unlink()
    (tmp_path / "claim-window").rmdir()
    with pytest.raises(AdapterError) as info:
        check_unchanged(infos)
    assert [p.split(":")[0] for p in info.value.problems] == ["calendar", "claim-window"]
    assert "changed since it was loaded" in info.value.problems[0] and "is gone" in info.value.problems[1]


@pytest.mark.parametrize("settings, message", [
    ({"restart_backoff_s": 60.0}, "restart_backoff_s (60) must not exceed gateway.restart_backoff_max_s (30)"),
    ({"restart_backoff_s": -1.0}, "gateway.restart_backoff_s must be >= 0"),
    ({"restart_backoff_max_s": 0.0}, "gateway.restart_backoff_max_s must be > 0"),
    ({"drain_grace_s": -1.0}, "gateway.drain_grace_s must be >= 0"),
])
def test_restart_and_drain_settings_are_checked(settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GatewayConfig(**settings)
