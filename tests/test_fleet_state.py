"""The fleet's one desired state: the state file, written as numbered versions, each only on top of the version
its writer started from, so that of two changes made at once (on two replicas sharing the file) one is applied and
the other refused, and nothing is half-written."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
from pathlib import Path

import pytest

from serving.lifecycle import AdapterRecord, DeploymentState, StateConflict, read_state, update_state


def _state(experts: list[str], candidate: str | None = None) -> DeploymentState:
    record = lambda name: AdapterRecord(name=name, path=f"/a/{name}", fingerprint=f"{name}-v1", prompt="")
    return DeploymentState(config_adapters=["router=/a/router"], router=record("router"), previous_router=None,
                           experts=[record(e) for e in experts], candidate=record(candidate) if candidate else None,
                           shadow_fraction=0.5 if candidate else None)


def test_each_change_is_the_next_version_on_top_of_the_one_it_started_from(tmp_path):
    path = tmp_path / "fleet.state.json"
    first = update_state(path, 0, _state(["calendar"]))
    assert first.version == 1 and read_state(path) == first
    second = update_state(path, 1, _state(["calendar", "chandra-ocr"], candidate="router4"))
    assert second.version == 2
    back = read_state(path)
    assert back.candidate.name == "router4" and back.shadow_fraction == 0.5 and back.version == 2


def test_a_change_started_from_an_older_version_is_refused_and_writes_nothing(tmp_path):
    path = tmp_path / "fleet.state.json"
    update_state(path, 0, _state(["calendar"]))
    update_state(path, 1, _state(["calendar", "chandra-ocr"]))
    before = path.read_bytes()
    with pytest.raises(StateConflict) as conflict:
        update_state(path, 1, _state(["calendar", "tables"]))
    assert (conflict.value.expected, conflict.value.found) == (1, 2)
    assert "version 2, not 1" in str(conflict.value)
    assert path.read_bytes() == before


def test_a_state_file_from_before_versions_reads_as_version_0(tmp_path):
    path = tmp_path / "old.state.json"
    old = {k: v for k, v in dataclasses.asdict(_state(["calendar"])).items()
           if k not in ("version", "candidate", "shadow_fraction")}
    path.write_text(json.dumps(old))
    assert read_state(path).version == 0
    assert update_state(path, 0, _state(["calendar"])).version == 1


def _race(path: str, start, results) -> None:
    start.wait()
    try:
        update_state(Path(path), 1, _state(["calendar", multiprocessing.current_process().name]))
        results.put("applied")
    except StateConflict:
        results.put("refused")


def test_of_two_replicas_changing_the_fleet_at_once_one_is_applied_and_the_other_refused(tmp_path):
    path = tmp_path / "fleet.state.json"
    update_state(path, 0, _state(["calendar"]))
    context = multiprocessing.get_context("fork")
    start, results = context.Barrier(2), context.Queue()
    replicas = [context.Process(target=_race, args=(str(path), start, results), name=f"replica-{i}")
                for i in range(2)]
    for replica in replicas:
        replica.start()
    for replica in replicas:
        replica.join(timeout=30)
    assert sorted(results.get(timeout=5) for _ in replicas) == ["applied", "refused"]
    state = read_state(path)
    assert state.version == 2 and state.experts[1].name in ("replica-0", "replica-1")
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file is left behind"
