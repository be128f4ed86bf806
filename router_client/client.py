"""RouterClient: route a screenshot with the router adapter, then run the chosen expert adapter on it.

    async with RouterClient(ClientConfig.from_deployment(load_config("configs/tiny-cpu.yaml"))) as client:
        result = await client.process("screen.png")
        print(result.decision.expert, result.result.text)

Every request goes to vLLM's OpenAI-compatible POST {base_url}/chat/completions with `model` set to the
adapter's served name and temperature 0. process_via_gateway() instead sends one `model: "auto"` request and
lets the routing gateway (`python -m serving`) route; chat_completion() sends any body as it is.

RouterClient is a facade: images are prepared by lora_router.images, router requests built and answers read by
lora_router.routing (the gateway uses the same functions), and HTTP (session, retries, errors) is _base_client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import Any

from lora_router import images, routing
from lora_router.images import ImageInput, PreparedImage
from lora_router.openai_wire import ResponseFormatError, chat_request, read_completion, user_turn
from router_client._base_client import BaseClient, Timeout
from router_client.config import ClientConfig
from router_client.errors import (
    APIResponseError,
    ClientConfigError,
    InvalidImageError,
    LowConfidenceError,
    RouterClientError,
    UnknownExpertError,
)
from router_client.types import (
    APIResponse,
    ClientStats,
    ExpertResult,
    ProcessResult,
    RouteDecision,
    RouterMode,
    StageTimings,
    ToolCall,
)


def prepare_image(image: ImageInput, *, max_pixels: int | None = None,
                  max_image_pixels: int = images.DEFAULT_MAX_IMAGE_PIXELS) -> PreparedImage:
    """lora_router.images.prepare_image, raising InvalidImageError (a RouterClientError) for an image that cannot be
    sent: not found, empty file, not an image, too many pixels, truncated."""
    try:
        return images.prepare_image(image, max_pixels=max_pixels, max_image_pixels=max_image_pixels)
    except images.InvalidImageError as exc:
        raise InvalidImageError(str(exc)) from None


class RouterClient:
    """Async client of one router + experts deployment on vLLM; owns its HTTP session.

    Use it as an async context manager (or call start() and close()). Entering it opens the session and, for
    router_mode 'auto' or 'one-token', asks the server's tokenizer for each label's first token. Safe to
    share between concurrent tasks; `stats` counts routes, fallbacks, retries and errors.
    """

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.stats = ClientStats()
        self._http = BaseClient(config, self.stats)
        self._first_tokens: dict[str, routing.FirstToken] | None = None
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
        self._http.open()
        await self._router_mode(None)

    async def close(self) -> None:
        """Close the HTTP session (a later call opens a new one)."""
        await self._http.close()

    @property
    def mode(self) -> RouterMode | None:
        """The router mode in use for router_mode from the config, once resolved (after start or first use)."""
        return self._mode

    @property
    def first_tokens(self) -> dict[str, str] | None:
        """Each label's canonical first token as the server's tokenizer writes it (None until asked)."""
        if self._first_tokens is None:
            return None
        return {label: token.text for label, token in self._first_tokens.items()}

    @property
    def _first_token_ids(self) -> dict[str, int]:
        """Each label's first token id: what one-token mode asks vLLM's log-probability of."""
        return {label: token.id for label, token in (self._first_tokens or {}).items()}

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
                         max_retries: int | None = None, extra_body: Mapping[str, Any] | None = None) -> ExpertResult:
        """Run `expert` (an expert name, or the base model's served name) on `image` with `prompt` (default:
        the expert's prompt from the config; base_prompt for the base model). `extra_body` adds fields to the
        request as openai-python's does (vLLM's sampling extras, e.g. {"ignore_eos": True}).

        Raises UnknownExpertError before any request for a name the deployment does not serve.
        """
        with self._count_errors():
            prompt = self._task_prompt(expert, prompt)
            prepared = await self._prepare(image)
            return await self._run_expert(expert, prepared, prompt, max_tokens, timeout, max_retries, extra_body)

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

    async def process_via_gateway(self, image: ImageInput, prompt: str | None = None, *,
                                  timeout: Timeout | None = None, max_retries: int | None = None) -> ProcessResult:
        """Send `image` to the routing gateway as one `auto` request; it routes, runs the chosen expert and
        answers with its completion and a `routing` object, read into the same ProcessResult as process().

        Without a prompt the gateway adds the routed expert's default prompt. timings.expert_s is the gateway
        call less the route. A route that fallback 'error' refuses is the gateway's 422 (an APIStatusError).
        """
        with self._count_errors():
            start = time.perf_counter()
            prepared = await self._prepare(image)
            image_s = time.perf_counter() - start
            if prompt:
                turn = user_turn(prepared.data_url, prompt)
            else:  # no text part: the gateway adds the routed expert's default prompt
                turn = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": prepared.data_url}}]}
            body = chat_request(self.config.auto_model, [turn], self.config.expert_max_tokens)
            sent = time.perf_counter()
            answer = await self._http.post_response(self.config.base_url + "/chat/completions", body, timeout,
                                                    max_retries)
            call_s = time.perf_counter() - sent
            decision = self._gateway_decision(answer.body)
            try:
                completion = read_completion(answer.body)
            except ResponseFormatError as exc:
                raise APIResponseError(str(exc)) from None
            expert_s = max(call_s - decision.latency_s, 0.0)
            result = ExpertResult(expert=decision.expert, text=completion.text,
                                  tool_call=ToolCall.parse(completion.text), prompt_tokens=completion.prompt_tokens,
                                  completion_tokens=completion.completion_tokens, latency_s=expert_s)
            timings = StageTimings(image_s=image_s, route_s=decision.latency_s, expert_s=expert_s,
                                   total_s=time.perf_counter() - start)
            return ProcessResult(decision=decision, result=result, timings=timings)

    async def chat_completion(self, body: dict[str, Any], *, timeout: Timeout | None = None,
                              max_retries: int | None = None) -> APIResponse:
        """POST a chat-completions body as it is (any served model; `auto` on the gateway) and return the 2xx
        answer with its status and headers. Other answers raise the APIStatusError of their status."""
        with self._count_errors():
            return await self._http.post_response(self.config.base_url + "/chat/completions", body, timeout,
                                                  max_retries)

    # Routing: the arithmetic and the policy are lora_router.routing's; this side sends and counts.

    async def _route(self, image: PreparedImage, mode: str | None, timeout: Timeout | None,
                     max_retries: int | None) -> RouteDecision:
        used = await self._router_mode(mode)
        first_tokens = self._first_tokens or {}
        body = routing.router_request(self.config.served(self.config.router_name), self.config.labels, image.data_url,
                                      used, first_tokens)
        start = time.perf_counter()
        completion = await self._http.chat_completion(body, timeout, max_retries)
        latency = time.perf_counter() - start
        try:
            outcome = routing.decide(completion, mode=used, labels=self.config.labels, first_tokens=first_tokens,
                                     min_confidence=self.config.min_confidence,
                                     fallback_target=self.config.fallback_target, latency_s=latency,
                                     temperature=self.config.temperature)
        except ResponseFormatError as exc:
            raise APIResponseError(str(exc)) from None
        self.stats.routes += 1
        if isinstance(outcome, routing.RouteRefused):
            if outcome.reason == "unknown_label":
                raise UnknownExpertError(outcome.message)
            raise LowConfidenceError(outcome.message, outcome.answer, outcome.confidence)
        if outcome.fallback_reason is not None:
            self.stats.fallbacks[outcome.fallback_reason] += 1
        return outcome

    def _gateway_decision(self, answer: dict[str, Any]) -> RouteDecision:
        """The RouteDecision in the gateway's `routing` object."""
        try:
            decision = RouteDecision.from_wire(answer.get("routing"))
        except ResponseFormatError as exc:
            raise APIResponseError(f"the answer to model {self.config.auto_model!r}: {exc}; is {self.config.base_url} "
                                   "the routing gateway (python -m serving)?") from None
        self.stats.routes += 1
        if decision.fallback_reason is not None:
            self.stats.fallbacks[decision.fallback_reason] += 1
        return decision

    async def _router_mode(self, requested: str | None) -> RouterMode:
        """The mode a route uses; asks /tokenize once for the labels' first tokens when needed."""
        requested = requested or self.config.router_mode
        if requested == self.config.router_mode and self._mode is not None:
            return self._mode
        try:
            if routing.needs_first_tokens(requested):
                async with self._tokens_lock:
                    if self._first_tokens is None:
                        await self._load_first_tokens()
            mode = routing.resolve_mode(requested, self._first_tokens or {})
        except routing.RoutingConfigError as exc:
            raise ClientConfigError(str(exc)) from None
        if requested == self.config.router_mode:
            self._mode = mode
        return mode

    async def _load_first_tokens(self) -> None:
        url = self.config.server_root + "/tokenize"
        answers = await asyncio.gather(*(
            self._http.post(url, routing.tokenize_request(self.config.served(self.config.router_name), label))
            for label in self.config.labels))
        try:
            self._first_tokens = {label: routing.read_first_token(answer, label)
                                  for label, answer in zip(self.config.labels, answers)}
        except ResponseFormatError as exc:
            raise APIResponseError(str(exc)) from None

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
                          timeout: Timeout | None, max_retries: int | None,
                          extra_body: Mapping[str, Any] | None = None) -> ExpertResult:
        body = chat_request(self.config.served(expert), [user_turn(image.data_url, prompt)],
                            max_tokens or self.config.expert_max_tokens, **(extra_body or {}))
        start = time.perf_counter()
        completion = await self._http.chat_completion(body, timeout, max_retries)
        latency = time.perf_counter() - start
        return ExpertResult(expert=expert, text=completion.text, tool_call=ToolCall.parse(completion.text),
                            prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens,
                            latency_s=latency)

    async def _prepare(self, image: ImageInput) -> PreparedImage:
        if isinstance(image, PreparedImage):
            return image
        # Decoding and PNG encoding take CPU time; off the event loop, other requests keep flowing.
        return await asyncio.to_thread(prepare_image, image, max_pixels=self.config.max_pixels,
                                       max_image_pixels=self.config.max_image_pixels)

    @contextlib.contextmanager
    def _count_errors(self) -> Iterator[None]:
        try:
            yield
        except RouterClientError as exc:
            self.stats.errors[type(exc).__name__] += 1
            raise
