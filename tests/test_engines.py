"""The gateway pins each screenshot to the data-parallel engine with the fewest requests in flight."""

from __future__ import annotations

import contextlib

import pytest

from serving.gateway.engines import EnginePicker


def test_one_engine_needs_no_pinning():
    with EnginePicker(1).pinned() as rank:
        assert rank is None


def test_the_least_loaded_engine_is_chosen_and_held_for_the_whole_request():
    picker = EnginePicker(3)
    with contextlib.ExitStack() as stack:
        first = [stack.enter_context(picker.pinned()) for _ in range(3)]
        assert sorted(first) == [0, 1, 2]  # one each before any engine gets a second
        assert picker.in_flight == [1, 1, 1]
        with picker.pinned() as rank:
            assert picker.in_flight[rank] == 2
    assert picker.in_flight == [0, 0, 0]


def test_a_busy_engine_is_skipped_until_the_others_catch_up():
    picker = EnginePicker(2)
    with picker.pinned() as busy:
        # A long request holds `busy`: every short one meanwhile goes to the other engine.
        others = set()
        for _ in range(5):
            with picker.pinned() as rank:
                others.add(rank)
        assert others == {1 - busy}


def test_idle_engines_take_turns_and_a_failed_request_frees_its_engine():
    picker = EnginePicker(2)
    ranks = []
    for _ in range(4):
        with picker.pinned() as rank:
            ranks.append(rank)
    assert ranks == [0, 1, 0, 1]
    with pytest.raises(RuntimeError), picker.pinned():
        raise RuntimeError("vLLM died")
    assert picker.in_flight == [0, 0]
