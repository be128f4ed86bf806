"""Validate a served router adapter (vLLM) on a held-out classification set: the in-process validation's report,
from the server's answers.

    python -m router_client.validate --adapter checkpoints/tiny/router \\
        --data datasets/routing/eval-classification.jsonl --out runs/validate-router-served \\
        --base-url http://127.0.0.1:8000/v1 --model router [--api-key KEY] [--structured-outputs]

Each line is sent as the client sends a screenshot: the line's system prompt, then a user turn [image, text],
the image prepared by serving.images (PNG data URL, pixels unchanged), `POST {base_url}/chat/completions` with
temperature 0 through the client's transport (bearer key, retries of connection errors, 429 and 5xx).
`--structured-outputs` adds `"structured_outputs": {"choice": labels}`. Compare with `python -m
training.validate_router` (in-process) on the same adapter and data: a train/serve mismatch shows up as two
different numbers.

Writes to --out what the in-process validation writes: metrics.json, confusion.png, predictions.jsonl; prints a
table. Labels come from the adapter's manifest (else the data's router prompt).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from router_client._base_client import BaseClient
from router_client.config import ClientConfig
from router_client.errors import RouterClientError
from router_client.types import ClientStats
from serving.images import prepare_image
from serving.openai_wire import chat_request, user_turn
from training.configuration import ConfigError, check_types, parse_command, run_command
from training.llava_data import Conversation, DataError, split_user
from training.validate_router import EvalSetArguments, eval_set, report_text, write_report

# Longest answer in tokens: a label, with room to see what an untrained router says instead.
MAX_TOKENS = 16
# Seconds one request may take (a first request to a cold server included).
TIMEOUT_S = 120.0


async def request_body(conversation: Conversation, model: str, labels: Sequence[str] | None) -> dict:
    """The chat request for one line: its system prompt, then user [image, text]; constrained to `labels` if
    given. DataError for a line whose user turn is not one image before the text."""
    if [kind for kind, _ in split_user(conversation.user)] != ["image", "text"]:
        raise DataError(f"{conversation.source}: served validation sends one image, then the text (as the client "
                        f"does); this line's user turn is {conversation.user!r}")
    # Decoding and PNG encoding take CPU time; off the event loop, other requests keep flowing.
    image = await asyncio.to_thread(prepare_image, conversation.images[0])
    system = [{"role": "system", "content": conversation.system}] if conversation.system is not None else []
    options = {"structured_outputs": {"choice": list(labels)}} if labels else {}
    return chat_request(model, [*system, user_turn(image.data_url, conversation.user_text)], MAX_TOKENS, **options)


async def served_answers(conversations: Sequence[Conversation], config: ClientConfig, labels: Sequence[str] | None,
                         concurrency: int = 8) -> list[str]:
    """The served router's answer to each line (config.router_name; concurrent requests). RuntimeError naming the
    line when a request fails after the client's retries."""
    http = BaseClient(config, ClientStats())
    semaphore = asyncio.Semaphore(concurrency)

    async def one(conversation: Conversation) -> str:
        async with semaphore:
            body = await request_body(conversation, config.router_name, labels)
            try:
                completion = await http.chat_completion(body)
            except RouterClientError as exc:
                raise RuntimeError(f"{conversation.source}: {type(exc).__name__}: {exc}") from exc
        return completion.text.strip()

    try:
        return list(await asyncio.gather(*(one(c) for c in conversations)))
    finally:
        await http.close()


def validate_served(data: Path, out: Path, base_url: str, model: str = "router", adapter: Path | None = None,
                    api_key: str | None = None, structured_outputs: bool = False, concurrency: int = 8,
                    limit: int | None = None) -> dict:
    """Validate the router served as `model` at `base_url` and write metrics.json, confusion.png and
    predictions.jsonl to `out`; returns the metrics."""
    conversations, labels = eval_set(data, adapter, limit)
    config = ClientConfig(base_url=base_url, router_name=model, labels=labels, api_key=api_key,
                          timeout_s=TIMEOUT_S)
    mode = f"served {model} at {base_url}" + (" (structured outputs)" if structured_outputs else "")
    start = time.perf_counter()
    answers = asyncio.run(served_answers(conversations, config, labels if structured_outputs else None, concurrency))
    return write_report(out, conversations, answers, labels, mode=mode, data=data, adapter=adapter,
                        seconds=time.perf_counter() - start)


@dataclass
class ServedArguments:
    """Which server and adapter `python -m router_client.validate` asks, and how."""

    base_url: str = field(metadata={"help": "OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1."})
    model: str = field(default="router", metadata={"help": "Served adapter name."})
    api_key: str | None = field(default=None, metadata={"help": "Bearer key (default: $LORA_ROUTER_API_KEY)."})
    structured_outputs: bool = field(default=False, metadata={
        "help": "Constrain answers to the labels (structured_outputs.choice)."})
    concurrency: int = field(default=8, metadata={"help": "Requests in flight."})

    def __post_init__(self) -> None:
        check_types(self)
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {self.concurrency}")
        self.api_key = self.api_key or os.environ.get("LORA_ROUTER_API_KEY")


def run(eval_args: EvalSetArguments, args: ServedArguments) -> int:
    """Validate the served router, write the files, print the report."""
    report = validate_served(eval_args.data, eval_args.out, args.base_url, model=args.model,
                             adapter=eval_args.adapter, api_key=args.api_key,
                             structured_outputs=args.structured_outputs, concurrency=args.concurrency,
                             limit=eval_args.limit)
    print(report_text(report, eval_args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    eval_args, args = parse_command([EvalSetArguments, ServedArguments], argv, prog="python -m router_client.validate",
                                    description=__doc__)
    return run_command(lambda: run(eval_args, args), runtime_errors=(ValueError, FileNotFoundError, RuntimeError))


if __name__ == "__main__":
    raise SystemExit(main())
