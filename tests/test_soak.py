"""The soak benchmark's accounting (benchmarks.soak), on made-up measurements: no server."""

from __future__ import annotations

import json

import pytest

from benchmarks.soak import SoakConfig, SoakMetrics, bad_requests, summarize, write_report
from lora_router.deployment import from_dict


def _metrics(vllm_growth_mb: float, slow_last_minute: bool, failed_at: float | None = None) -> SoakMetrics:
    requests, memory = [], []
    for i in range(180):  # one good request a second for three minutes, every 10th a bad one refused with 400
        start = float(i)
        slow = slow_last_minute and start >= 120
        if i % 10 == 9:
            requests.append({"start_s": start, "e2e_s": 0.01, "kind": "corrupt image", "status": 400, "ok": True})
            continue
        ok = failed_at is None or start != failed_at
        requests.append({"start_s": start, "e2e_s": 0.5 if slow else 0.2 + (i % 7) / 100, "kind": "good",
                         "status": 200 if ok else 502, "ok": ok})
    for t in range(0, 180, 5):
        worker = 2000.0 + vllm_growth_mb * t / 180  # the worker grows, the API server does not
        memory.append({"t_s": float(t), "gateway_mb": 300.0, "vllm_mb": 1000.0 + worker,
                       "vllm_by_process_mb": {"python": 1000.0, "VLLM::Worker": worker}})
    return SoakMetrics(seconds=180.0, requests=requests, memory=memory)


CONFIG = SoakConfig(minutes=3, warmup_minutes=1)


def test_a_steady_run_meets_every_target_and_counts_each_minute():
    metrics = summarize(_metrics(vllm_growth_mb=0, slow_last_minute=False), CONFIG)
    assert [m["minute"] for m in metrics.per_minute] == [1, 2, 3]
    assert all(m["requests"] == 60 and m["good"] == 54 and m["bad"] == 6 for m in metrics.per_minute)
    assert metrics.summary["good_failed"] == 0 and metrics.summary["bad_not_refused_as_expected"] == 0
    assert metrics.summary["memory_growth"]["vllm"]["growth_pct"] == 0
    assert all(metrics.summary["targets"].values()), metrics.summary
    # Minutes 2 and 3 pooled, one each: the same latencies, so the same p99.
    first, second = metrics.summary["p99_halves_s"]
    assert first == pytest.approx(second) and 0.2 <= first <= 0.27


@pytest.mark.parametrize("growth, slow, failed, missed", [
    (1000, False, None, "memory growth <= 5% (gateway and vLLM)"),
    (0, True, None, "last minute's p99 within 20% of the first's"),
    (0, False, 100.0, "0 failed good requests"),
])
def test_each_target_is_missed_by_what_it_watches(growth, slow, failed, missed):
    metrics = summarize(_metrics(growth, slow, failed), CONFIG)
    assert [t for t, met in metrics.summary["targets"].items() if not met] == [missed]
    # Which process grew: the medians of the same two minutes, per vLLM process.
    by_process = metrics.summary["vllm_by_process"]
    assert by_process["python"] == {"first_mb": 1000.0, "last_mb": 1000.0}
    assert by_process["VLLM::Worker"]["last_mb"] - by_process["VLLM::Worker"]["first_mb"] == pytest.approx(
        growth / 3, abs=growth / 30 + 1e-9)
    first, second = metrics.summary["p99_halves_s"]
    assert (second == pytest.approx(0.5)) is slow and first < 0.3  # the slow last minute shows in its half


def test_the_report_has_json_markdown_and_plot(tmp_path):
    metrics = summarize(_metrics(vllm_growth_mb=0, slow_last_minute=False), CONFIG)
    write_report(metrics, from_dict({}), CONFIG, tmp_path)
    saved = json.loads((tmp_path / "soak.json").read_text())
    assert saved["setup"]["soak"]["concurrency"] == 16 and len(saved["per_minute"]) == 3
    assert "requests" not in saved and saved["summary"]["requests"] == 180
    assert "| 3 | 60 | 0 | 6 | 0 |" in (tmp_path / "soak.md").read_text()
    assert "vLLM by process: VLLM::Worker 2000 -> 2000 MB, python 1000 -> 1000 MB." in (tmp_path / "soak.md").read_text()
    assert (tmp_path / "soak.png").stat().st_size > 0


def test_bad_requests_name_the_status_they_must_get():
    names = {b.name: b.status for b in bad_requests("auto", "data:image/png;base64,AAAA")}
    assert names == {"corrupt image": 400, "unknown model": 404, "no image": 400, "not JSON": 400}


@pytest.mark.parametrize("settings, words", [
    ({"minutes": 2, "warmup_minutes": 1}, "warmup_minutes must leave at least two minutes"),
    ({"bad_fraction": 1.0}, "bad_fraction must be in [0, 1)"),
    ({"concurrency": 0}, "concurrency, screenshots and max_tokens must be >= 1"),
])
def test_bad_settings_are_refused(settings, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace(")", r"\)")):
        SoakConfig(**settings)
