"""Validate a served router adapter (vLLM) on a held-out classification set: the in-process validation's report,
from the server's answers, asked the way the client asks.

    python -m benchmarks.validate_served --adapter checkpoints/tiny/router \\
        --data datasets/routing/eval-classification.jsonl --out runs/validate-router-served \\
        --base-url http://127.0.0.1:8000/v1 --model router [--api-key KEY] [--write_calibration]

Each line's screenshot is prepared by lora_router.images and routed in both of the client's router modes
(lora_router.routing's requests, through the client's transport: bearer key, retries of connection errors, 429 and
5xx): one-token (the report's answers, and the label scores from the logprobs, as the client reads them) and
choice (answers constrained to the labels); the report counts where the two modes disagree. When two labels
share a first token, one-token cannot tell them apart: choice alone answers and there is no calibration.
Compare with `python -m training.validate_router` (in-process) on the same adapter and data: a train/serve
mismatch shows up as two different numbers.

Writes to --out what the in-process validation writes: metrics.json, confusion.png, reliability.png,
predictions.jsonl; prints a table. Labels come from the adapter's manifest (else the data's router prompt).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lora_router import routing
from lora_router.configuration import ConfigError, check_types, parse_command, run_command
from lora_router.images import prepare_image
from lora_router.openai_wire import ResponseFormatError
from lora_router.prompts import ROUTER_USER_PROMPT, router_system_prompt
from router_client._base_client import BaseClient
from router_client.config import ClientConfig
from router_client.errors import RouterClientError
from router_client.types import ClientStats
from training.llava_data import Conversation, DataError, split_user
from training.validate_router import EvalSetArguments, eval_set, report_text, store_calibration, write_report

# Seconds one request may take (a first request to a cold server included).
TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ServedAnswer:
    """One line's answers: one-token's label (or its text when it named none) with the label scores, and
    choice mode's label."""

    one_token: str | None
    scores: list[float] | None
    choice: str


def check_line(conversation: Conversation, labels: Sequence[str]) -> None:
    """DataError unless the line is what the client sends: the router system prompt for `labels`, then one image
    before the router's user prompt."""
    if [kind for kind, _ in split_user(conversation.user)] != ["image", "text"]:
        raise DataError(f"{conversation.source}: served validation sends one image, then the text (as the client "
                        f"does); this line's user turn is {conversation.user!r}")
    if conversation.system != router_system_prompt(labels) or conversation.user_text != ROUTER_USER_PROMPT:
        raise DataError(f"{conversation.source}: its prompts are not the client's router prompts for labels "
                        f"{list(labels)} (lora_router.prompts)")


async def served_answers(conversations: Sequence[Conversation], config: ClientConfig,
                         concurrency: int = 8) -> list[ServedAnswer]:
    """The served router's answers to each line in both modes (config.router_name; concurrent requests).
    RuntimeError naming the line when a request fails after the client's retries."""
    http = BaseClient(config, ClientStats())
    semaphore = asyncio.Semaphore(concurrency)
    labels = config.labels

    async def ask(source: str, body: dict, mode: routing.RouterMode,
                  first: dict[str, routing.FirstToken]) -> tuple[routing.RouterAnswer, dict[str, float] | None]:
        try:
            completion = await http.chat_completion(body)
            scores = routing.label_scores(completion, labels, first) if mode == "one-token" else None
            return routing.read_router_answer(completion, mode, labels, first), scores
        except (RouterClientError, ResponseFormatError) as exc:
            raise RuntimeError(f"{source}: {type(exc).__name__}: {exc}") from exc

    async def one(conversation: Conversation, first: dict[str, routing.FirstToken] | None) -> ServedAnswer:
        async with semaphore:
            # Decoding and PNG encoding take CPU time; off the event loop, other requests keep flowing.
            url = (await asyncio.to_thread(prepare_image, conversation.images[0])).data_url
            choice, _ = await ask(conversation.source,
                                  routing.router_request(config.router_name, labels, url, "choice", {}), "choice", {})
            if first is None:
                return ServedAnswer(None, None, choice.label or choice.raw)
            answer, scores = await ask(conversation.source, routing.router_request(
                config.router_name, labels, url, "one-token", first), "one-token", first)
        return ServedAnswer(answer.label or answer.raw, [scores[label] for label in labels],
                            choice.label or choice.raw)

    try:
        try:
            tokens = {label: routing.read_first_token(await http.post(
                config.server_root + "/tokenize", routing.tokenize_request(config.router_name, label)), label)
                for label in labels}
        except (RouterClientError, ResponseFormatError) as exc:
            raise RuntimeError(f"asking the router's tokenizer for the labels' first tokens: "
                               f"{type(exc).__name__}: {exc}") from exc
        first = tokens if routing.one_token_problem(tokens) is None else None
        return list(await asyncio.gather(*(one(c, first) for c in conversations)))
    finally:
        await http.close()


def validate_served(data: Path, out: Path, base_url: str, model: str = "router", adapter: Path | None = None,
                    api_key: str | None = None, concurrency: int = 8, limit: int | None = None,
                    target_accuracy: float | None = None) -> dict:
    """Validate the router served as `model` at `base_url` and write metrics.json, confusion.png, reliability.png
    and predictions.jsonl to `out`; returns the metrics, with how often the two router modes agreed."""
    conversations, labels = eval_set(data, adapter, limit)
    for conversation in conversations:
        check_line(conversation, labels)
    config = ClientConfig(base_url=base_url, router_name=model, labels=labels, api_key=api_key,
                          timeout_s=TIMEOUT_S)
    start = time.perf_counter()
    answers = asyncio.run(served_answers(conversations, config, concurrency))
    scored = answers[0].scores is not None if answers else False
    modes = {"one-token": [a.one_token for a in answers], "choice": [a.choice for a in answers]} if scored else None
    disagree = [c.id for c, a in zip(conversations, answers) if scored and a.one_token != a.choice]
    extra = {"router_modes": {"compared": len(answers) if scored else 0, "disagree": len(disagree),
                              "disagreeing_ids": disagree[:20]}}
    return write_report(out, conversations, modes["one-token"] if modes else [a.choice for a in answers], labels,
                        mode=f"served {model} at {base_url} ({'one-token' if scored else 'choice'})", data=data,
                        adapter=adapter, seconds=time.perf_counter() - start,
                        scores=[a.scores for a in answers] if scored else None,
                        **({"target_accuracy": target_accuracy} if target_accuracy is not None else {}),
                        extra=extra)


@dataclass
class ServedArguments:
    """Which server and adapter `python -m benchmarks.validate_served` asks, and how."""

    base_url: str = field(metadata={"help": "OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1."})
    model: str = field(default="router", metadata={"help": "Served adapter name."})
    api_key: str | None = field(default=None, metadata={"help": "Bearer key (default: $LORA_ROUTER_API_KEY)."})
    concurrency: int = field(default=8, metadata={"help": "Requests in flight."})

    def __post_init__(self) -> None:
        check_types(self)
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {self.concurrency}")
        self.api_key = self.api_key or os.environ.get("LORA_ROUTER_API_KEY")


def run(eval_args: EvalSetArguments, args: ServedArguments) -> int:
    """Validate the served router, write the files, print the report."""
    report = validate_served(eval_args.data, eval_args.out, args.base_url, model=args.model,
                             adapter=eval_args.adapter, api_key=args.api_key, concurrency=args.concurrency,
                             limit=eval_args.limit, target_accuracy=eval_args.target_accuracy)
    modes = report["router_modes"]
    print(report_text(report, eval_args.out))
    print(f"router modes: one-token and choice disagree on {modes['disagree']} of {modes['compared']} screenshots")
    if eval_args.write_calibration:
        print(store_calibration(report, eval_args.adapter))
    return 0


def main(argv: list[str] | None = None) -> int:
    eval_args, args = parse_command([EvalSetArguments, ServedArguments], argv, prog="python -m benchmarks.validate_served",
                                    description=__doc__)
    return run_command(lambda: run(eval_args, args), runtime_errors=(ValueError, FileNotFoundError, RuntimeError))


if __name__ == "__main__":
    raise SystemExit(main())
