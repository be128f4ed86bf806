"""RouterClient: route a screenshot with the router adapter, then run the chosen expert adapter on it.

    async with RouterClient(ClientConfig.from_deployment(load_config("configs/tiny-cpu.yaml"))) as client:
        result = await client.process("screen.png")
        print(result.decision.expert, result.result.text)

Every request goes to vLLM's OpenAI-compatible POST {base_url}/chat/completions with `model` set to the
adapter's served name and temperature 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import math
import random
import time
from collections.abc import Iterator, Mapping
from typing import Any

import aiohttp

from router_client import _constants as C
from router_client.config import ClientConfig
from router_client.errors import (
    APIConnectionError,
    APIResponseError,
    APIStatusError,
    APITimeoutError,
    ClientConfigError,
    InternalServerError,
    LowConfidenceError,
    RateLimitError,
    RouterClientError,
    UnknownExpertError,
    status_error_class,
)
from router_client.images import ImageInput, PreparedImage, prepare_image
from router_client.types import (
    ClientStats,
    ExpertResult,
    FallbackReason,
    ProcessResult,
    RouteDecision,
    RouterMode,
    StageTimings,
    ToolCall,
)
from training.prompts import ROUTER_USER_PROMPT, router_system_prompt

Timeout = float | aiohttp.ClientTimeout
_RETRIED = (APIConnectionError, RateLimitError, InternalServerError)


class RouterClient:
    """Async client of one router + experts deployment on vLLM; owns its HTTP session.

    Use it as an async context manager (or call start() and close()). Entering it opens the session and, for
    router_mode 'auto' or 'one-token', asks the server's tokenizer for each label's first token. Safe to
    share between concurrent tasks; `stats` counts routes, fallbacks, retries and errors.
    """

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.stats = ClientStats()
        self._session: aiohttp.ClientSession | None = None
        self._first_tokens: dict[str, str] | None = None
        self._first_token_ids: dict[str, int] = {}
        self._mode: RouterMode | None = None
        self._tokens_lock = asyncio.Lock()

    async def __aenter__(self) -> RouterClient:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Open the session and resolve the configured router mode; also done on first use."""
        self._ensure_session()
        await self._router_mode(None)

    async def close(self) -> None:
        """Close the HTTP session (a later call opens a new one)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    @property
    def mode(self) -> RouterMode | None:
        """The router mode in use for router_mode from the config, once resolved (after start or first use)."""
        return self._mode

    @property
    def first_tokens(self) -> dict[str, str] | None:
        """Each label's canonical first token as the server's tokenizer writes it (None until asked)."""
        return None if self._first_tokens is None else dict(self._first_tokens)

    async def route(self, image: ImageInput, *, mode: str | None = None, timeout: Timeout | None = None,
                    max_retries: int | None = None) -> RouteDecision:
        """Ask the router which expert handles `image`; apply the fallback policy to an answer that is no
        label or is below min_confidence.

        `mode` ('auto', 'choice', 'one-token') overrides the config's router_mode for this call. Raises
        UnknownExpertError or LowConfidenceError under fallback 'error', InvalidImageError, and the API errors.
        """
        with self._count_errors():
            prepared = await self._prepare(image)
            return await self._route(prepared, mode, timeout, max_retries)

    async def run_expert(self, expert: str, image: ImageInput, prompt: str | None = None, *,
                         max_tokens: int | None = None, timeout: Timeout | None = None,
                         max_retries: int | None = None) -> ExpertResult:
        """Run `expert` (an expert name, or the base model's served name) on `image` with `prompt` (default:
        the expert's prompt from the config; base_prompt for the base model).

        Raises UnknownExpertError before any request for a name the deployment does not serve.
        """
        with self._count_errors():
            prompt = self._task_prompt(expert, prompt)
            prepared = await self._prepare(image)
            return await self._run_expert(expert, prepared, prompt, max_tokens, timeout, max_retries)

    async def process(self, image: ImageInput, prompt: str | None = None, *, mode: str | None = None,
                      timeout: Timeout | None = None, max_retries: int | None = None) -> ProcessResult:
        """Route `image`, then run the chosen expert on it with `prompt` (default: that expert's prompt).

        The image is encoded once: both requests carry the same bytes, so vLLM encodes the image once.
        """
        with self._count_errors():
            start = time.perf_counter()
            prepared = await self._prepare(image)
            image_s = time.perf_counter() - start
            decision = await self._route(prepared, mode, timeout, max_retries)
            task_prompt = self._task_prompt(decision.expert, prompt)
            result = await self._run_expert(decision.expert, prepared, task_prompt, None, timeout, max_retries)
            timings = StageTimings(image_s=image_s, route_s=decision.latency_s, expert_s=result.latency_s,
                                   total_s=time.perf_counter() - start)
            return ProcessResult(decision=decision, result=result, timings=timings)

    # Routing.

    async def _route(self, image: PreparedImage, mode: str | None, timeout: Timeout | None,
                     max_retries: int | None) -> RouteDecision:
        used = await self._router_mode(mode)
        labels = self.config.labels
        messages = [{"role": "system", "content": router_system_prompt(labels)}, _user_turn(image, ROUTER_USER_PROMPT)]
        body: dict[str, Any] = {"model": self.config.router_name, "messages": messages, "temperature": 0,
                                "logprobs": True}
        if used == "choice":
            # A label is at most one token per byte; one more for the end-of-sequence token.
            body["max_tokens"] = max(len(label.encode()) for label in labels) + 1
            body["structured_outputs"] = {"choice": labels}
        else:
            # vLLM returns the full-vocabulary log-probability of exactly these ids (as "token_id:N", matched
            # against /tokenize's ids whatever the tokenizer's byte-level spelling), so no label goes unseen.
            body.update(max_tokens=1, logprob_token_ids=list(self._first_token_ids.values()),
                        return_tokens_as_token_ids=True)
        start = time.perf_counter()
        answer = await self._post(self.config.base_url + "/chat/completions", body, timeout, max_retries)
        latency = time.perf_counter() - start
        raw, prompt_tokens, completion_tokens, logprobs = _read_completion(answer)
        if not logprobs:
            raise APIResponseError("router answer has no logprobs (requested with logprobs=true)")
        label: str | None
        if used == "choice":
            label = raw.strip() if raw.strip() in labels else None
            probabilities = {label: math.exp(sum(_entry_logprob(e) for e in logprobs))} if label else {}
        else:
            probabilities = self._one_token_probabilities(logprobs[0])
            # The router's own greedy token must start a label; otherwise its answer is no expert.
            sampled = {f"token_id:{i}": name for name, i in self._first_token_ids.items()}.get(logprobs[0].get("token"))
            label = max(labels, key=probabilities.__getitem__) if sampled else None
        self.stats.routes += 1
        confidence = probabilities[label] if label else 0.0
        reason: FallbackReason | None = None
        if label is None:
            reason = "unknown_label"
        elif confidence < self.config.min_confidence:
            reason = "low_confidence"
        expert = label if reason is None else self._fallback(reason, label or raw, confidence)
        return RouteDecision(expert=expert, confidence=confidence, probabilities=probabilities, mode=used,
                             latency_s=latency, raw=raw, prompt_tokens=prompt_tokens,
                             completion_tokens=completion_tokens, fallback_reason=reason)

    def _one_token_probabilities(self, first: dict[str, Any]) -> dict[str, float]:
        """Softmax over the labels' first-token log-probabilities (a label vLLM did not return gets 0)."""
        by_token = {f"token_id:{token_id}": label for label, token_id in self._first_token_ids.items()}
        found: dict[str, float] = {}
        for alternative in first.get("top_logprobs") or []:
            label = by_token.get(alternative.get("token"))
            if label is not None:
                found[label] = _entry_logprob(alternative)
        probabilities = dict.fromkeys(self.config.labels, 0.0)
        if found:
            top = max(found.values())
            weights = {label: math.exp(lp - top) for label, lp in found.items()}
            total = sum(weights.values())
            probabilities.update({label: w / total for label, w in weights.items()})
        return probabilities

    def _fallback(self, reason: FallbackReason, answer: str, confidence: float) -> str:
        """The fallback target for a rejected router answer, or the error the 'error' policy raises."""
        target = self.config.fallback_target
        if target is not None:
            self.stats.fallbacks[reason] += 1
            return target
        if reason == "unknown_label":
            raise UnknownExpertError(f"the router answered {answer!r}, which is no expert "
                                     f"(experts: {', '.join(self.config.labels)})")
        raise LowConfidenceError(f"the router chose {answer!r} with confidence {confidence:.3f}, below "
                                 f"min_confidence {self.config.min_confidence}", answer, confidence)

    async def _router_mode(self, requested: str | None) -> RouterMode:
        """The mode a route uses; asks /tokenize once for the labels' first tokens when needed."""
        requested = requested or self.config.router_mode
        if requested not in C.ROUTER_MODES:
            raise ClientConfigError(f"router mode must be one of {', '.join(C.ROUTER_MODES)}, got {requested!r}")
        if requested == self.config.router_mode and self._mode is not None:
            return self._mode
        if requested == "choice":
            mode: RouterMode = "choice"
        else:
            async with self._tokens_lock:
                if self._first_tokens is None:
                    await self._load_first_tokens()
            problem = self._one_token_problem()
            if problem is not None and requested == "one-token":
                raise ClientConfigError(f"router mode 'one-token' cannot tell the labels apart: {problem}")
            mode = "choice" if problem else "one-token"
        if requested == self.config.router_mode:
            self._mode = mode
        return mode

    async def _load_first_tokens(self) -> None:
        url = self.config.server_root + "/tokenize"
        answers = await asyncio.gather(*(
            self._post(url, {"model": self.config.router_name, "prompt": label, "add_special_tokens": False,
                             "return_token_strs": True}, None, None)
            for label in self.config.labels))
        ids, strs = {}, {}
        for label, answer in zip(self.config.labels, answers):
            tokens, token_strs = answer.get("tokens"), answer.get("token_strs")
            if not tokens or not token_strs or len(tokens) != len(token_strs):
                raise APIResponseError(f"/tokenize answered {answer!r} for label {label!r}: expected tokens "
                                       "and token_strs")
            ids[label], strs[label] = tokens[0], token_strs[0]
        self._first_token_ids, self._first_tokens = ids, strs

    def _one_token_problem(self) -> str | None:
        """Why one-token mode cannot work for these labels (two labels share a first token), or None."""
        assert self._first_tokens is not None
        seen: dict[str, str] = {}
        for label, token in self._first_tokens.items():
            if token in seen:
                return f"{seen[token]!r} and {label!r} both start with token {token!r}"
            seen[token] = label
        return None

    # Experts.

    def _task_prompt(self, expert: str, prompt: str | None) -> str:
        if expert != self.config.base_name and expert not in self.config.labels:
            raise UnknownExpertError(f"unknown expert {expert!r} (experts: {', '.join(self.config.labels)}; "
                                     f"base model: {self.config.base_name!r})")
        if prompt:
            return prompt
        if expert == self.config.base_name:
            return self.config.base_prompt
        if expert not in self.config.expert_prompts:
            raise ClientConfigError(f"expert {expert!r} has no default prompt in the config; pass a prompt")
        return self.config.expert_prompts[expert]

    async def _run_expert(self, expert: str, image: PreparedImage, prompt: str, max_tokens: int | None,
                          timeout: Timeout | None, max_retries: int | None) -> ExpertResult:
        body = {"model": expert, "messages": [_user_turn(image, prompt)], "temperature": 0,
                "max_tokens": max_tokens or self.config.expert_max_tokens}
        start = time.perf_counter()
        answer = await self._post(self.config.base_url + "/chat/completions", body, timeout, max_retries)
        latency = time.perf_counter() - start
        text, prompt_tokens, completion_tokens, _ = _read_completion(answer)
        return ExpertResult(expert=expert, text=text, tool_call=ToolCall.parse(text), prompt_tokens=prompt_tokens,
                            completion_tokens=completion_tokens, latency_s=latency)

    # HTTP.

    async def _prepare(self, image: ImageInput) -> PreparedImage:
        if isinstance(image, PreparedImage):
            return image
        # Decoding and PNG encoding take CPU time; off the event loop, other requests keep flowing.
        return await asyncio.to_thread(prepare_image, image, max_pixels=self.config.max_pixels,
                                       max_image_pixels=self.config.max_image_pixels)

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.config.max_connections), headers=headers)
        return self._session

    def _client_timeout(self, timeout: Timeout | None) -> aiohttp.ClientTimeout:
        if isinstance(timeout, aiohttp.ClientTimeout):
            return timeout
        total = self.config.timeout_s if timeout is None else timeout
        return aiohttp.ClientTimeout(total=total, connect=min(self.config.connect_timeout_s, total),
                                     sock_read=min(self.config.read_timeout_s, total))

    async def _post(self, url: str, body: dict[str, Any], timeout: Timeout | None,
                    max_retries: int | None) -> dict[str, Any]:
        """POST JSON and return the JSON answer, retrying connection errors, timeouts, 429 and 5xx."""
        retries = self.config.max_retries if max_retries is None else max_retries
        client_timeout = self._client_timeout(timeout)
        attempt = 0
        while True:
            try:
                return await self._post_once(url, body, client_timeout)
            except _RETRIED as exc:
                if attempt >= retries:
                    raise
                delay = _retry_delay(attempt, exc)
            attempt += 1
            self.stats.retries += 1
            await asyncio.sleep(delay)

    async def _post_once(self, url: str, body: dict[str, Any], timeout: aiohttp.ClientTimeout) -> dict[str, Any]:
        session = self._ensure_session()
        self.stats.requests += 1
        try:
            async with session.post(url, json=body, timeout=timeout) as response:
                data = await response.read()
                status, headers = response.status, response.headers.copy()
        except TimeoutError as exc:  # aiohttp's read and connect timeouts are TimeoutError subclasses too
            raise APITimeoutError(f"POST {url}: no answer within the timeout ({timeout.total} s total, "
                                  f"{timeout.sock_read} s read)") from exc
        except aiohttp.ClientError as exc:
            raise APIConnectionError(f"POST {url}: {type(exc).__name__}: {exc}") from exc
        text = data.decode("utf-8", errors="replace")
        try:
            answer: Any = json.loads(text)
        except ValueError:
            answer = None
        if not 200 <= status < 300:
            error_class = status_error_class(status)
            raise error_class(f"{status} from POST {url}: {_error_message(answer, text)}", status_code=status,
                              request_id=headers.get("x-request-id"),
                              body=text if answer is None else answer, headers=headers)
        if not isinstance(answer, dict):
            raise APIResponseError(f"POST {url} answered {status} with a body that is no JSON object: {text[:200]!r}")
        return answer

    @contextlib.contextmanager
    def _count_errors(self) -> Iterator[None]:
        try:
            yield
        except RouterClientError as exc:
            self.stats.errors[type(exc).__name__] += 1
            raise


def _user_turn(image: PreparedImage, text: str) -> dict[str, Any]:
    # Image part before the text part: training rendered "<image>\n<text>".
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image.data_url}},
                                        {"type": "text", "text": text}]}


def _read_completion(answer: dict[str, Any]) -> tuple[str, int, int, list[dict[str, Any]] | None]:
    """Text, prompt tokens, completion tokens and logprobs content of a chat completion."""
    try:
        choice = answer["choices"][0]
        text = choice["message"].get("content") or ""
        usage = answer.get("usage") or {}
        logprobs = (choice.get("logprobs") or {}).get("content")
        return text, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)), logprobs
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
        raise APIResponseError(f"not a chat completion ({type(exc).__name__}: {exc}): {str(answer)[:200]}") from None


def _entry_logprob(entry: Mapping[str, Any]) -> float:
    value = entry.get("logprob")
    if not isinstance(value, (int, float)):
        raise APIResponseError(f"logprobs entry without a logprob: {entry!r}")
    return float(value)


def _error_message(answer: Any, text: str) -> str:
    """vLLM's error message ({"error": {"message": ...}} or {"message": ...}), else the start of the body."""
    if isinstance(answer, dict):
        error = answer.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if answer.get("message"):
            return str(answer["message"])
    return text[:500] or "(empty body)"


def _retry_delay(attempt: int, exc: RouterClientError) -> float:
    """Seconds before retry number attempt + 1: the server's Retry-After (capped), else jittered backoff."""
    retry_after = _retry_after_s(exc.headers) if isinstance(exc, APIStatusError) else None
    if retry_after is not None:
        return retry_after
    delay = min(C.INITIAL_RETRY_DELAY_S * 2 ** attempt, C.MAX_RETRY_DELAY_S)
    return delay * (1 - 0.25 * random.random())


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Retry-After as seconds (a number or an HTTP date), capped at MAX_RETRY_AFTER_S; None if absent/bad."""
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), C.MAX_RETRY_AFTER_S)
