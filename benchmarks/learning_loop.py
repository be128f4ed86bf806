"""The router learning from its own traffic, on a running deployment, through its public and admin APIs (issue 25).

    python -m benchmarks.learning_loop [--family classic] [--traffic_per_class 100] [--labelled 240]
                                       [--recipe tower] [--weight 3] [--test_per_class 40] [--out DIR]

1. Screenshots in a look the router never saw (`--family`, a held-out style family) arrive through `auto`; the
   live router's accuracy on them is recorded. The gateway captures a random `--fraction` of them.
2. Callers send feedback on the routes they know to be wrong, with the right expert (played from the true labels):
   each captures its screenshot, labelled. A reviewer labels random captures in Label Studio (played: the tasks
   `training.captures` exports, annotated with the truth, imported back), until `--labelled` captures are labelled.
3. `training.captures export --base` merges them into the base routing data (`--weight` times each); the router is
   retrained on it with the trainer (`--recipe`: `lm` the main job's recipe, `tower` with LoRA on the vision tower),
   from the live router's weights on `--replay_per_class` base lines for `--warm_epochs` (`--warm_start`, the
   default), or from scratch on all of it.
4. The new router is loaded as a candidate and shadowed on live traffic: a fresh set of the family and of today's
   looks, routed by the live router (its accuracy "before"); the shadow report also scores both routers on the
   labelled held-out captures. It is promoted through the admin API, and the same fresh sets routed again ("after").

Every request must be answered: the failures are listed. Alone, it starts the deployment (`--config`, the tiny
default) in a process of its own with capture, the admin API and tower LoRA on, and first trains the live router on
the base data as the main job does; the integration test (tests/test_learning_loop.py) plays the same loop, smaller,
on the suite's server. Writes learning-loop.json, learning-loop.md and learning-loop.png to --out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.server import ServerProcess, until
from lora_router.capture import CaptureStore
from lora_router.configuration import CommandError, check_types, parse_command, run_command
from lora_router.deployment import DeploymentArguments, DeploymentConfig
from lora_router.images import prepare_image
from lora_router.openai_wire import bearer_headers
from lora_router.percentiles import Percentiles, percentiles
from lora_router.resources import configs_dir
from training.captures import choice_result, export, import_labels, label_studio_tasks
from training.convert_routing_to_classification import convert_dataset
from training.screens import generate
from training.screens.styles import FAMILIES
from training.train_qwen import main as train_cli

log = logging.getLogger(__name__)

RECIPES = {"lm": [], "tower": ["--lora_target_modules", "all-linear", "--lora_vision_tower", "True"]}
# Seeds of the traffic and of the fresh test sets: apart from each other and from generate_dataset's.
_TRAFFIC_SEED, _FRESH_SEED, _IN_DISTRIBUTION_SEED = 600_000, 700_000, 800_000
JSON_NAME, MARKDOWN_NAME, PNG_NAME = "learning-loop.json", "learning-loop.md", "learning-loop.png"


@dataclass
class LoopConfig:
    """The loop's settings."""

    family: str = field(default="classic", metadata={"help": "The unseen style family the traffic is in."})
    traffic_per_class: int = field(default=100, metadata={"help": "Screenshots of the family sent per class."})
    labelled: int = field(default=240, metadata={"help": "Most labelled captures (feedback, then review)."})
    fraction: float = field(default=0.5, metadata={
        "help": "gateway.capture.fraction of the deployment the command starts (the test's server sets its own)."})
    recipe: str = field(default="tower", metadata={"help": f"The retrained router's recipe: {', '.join(RECIPES)}."})
    weight: int = field(default=3, metadata={"help": "Times each captured training line is repeated."})
    warm_start: bool = field(default=True, metadata={
        "help": "Retrain from the live router's weights (the trainer's --init_adapter) for warm_epochs on the "
                "captures and replay_per_class base lines; else from scratch on all the base data, the recipe's "
                "epochs."})
    replay_per_class: int = field(default=300, metadata={
        "help": "Warm start: base training lines per class (all of the default base data; fewer cost in-distribution "
                "accuracy: 50 per class gave 0.90-0.96 against 0.975 here)."})
    warm_epochs: float = field(default=3.0, metadata={"help": "Warm start: epochs over captures and replay."})
    base_per_class: int = field(default=300, metadata={"help": "Base routing screenshots per class."})
    test_per_class: int = field(default=40, metadata={"help": "Fresh screenshots per class, family and today's."})
    concurrency: int = field(default=4, metadata={"help": "auto requests in flight."})
    router_recipe: Path = field(default=configs_dir() / "training" / "router-tiny.yaml", metadata={
        "help": "The router's trainer YAML (the main job's)."})
    train_args: list[str] = field(default_factory=list, metadata={
        "help": "More trainer flags for the retraining (they come last: e.g. --learning_rate 5e-4)."})

    def __post_init__(self) -> None:
        check_types(self)
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        if min(self.traffic_per_class, self.labelled, self.weight, self.test_per_class, self.concurrency,
               self.replay_per_class) < 1 or self.warm_epochs <= 0:
            raise ValueError("traffic_per_class, labelled, weight, test_per_class, concurrency and replay_per_class "
                             "must be >= 1, warm_epochs > 0")


@dataclass(frozen=True)
class LoopTarget:
    """The running deployment the loop plays on."""

    base_url: str  # the gateway's OpenAI root (…/v1)
    root_url: str
    api_key: str | None
    admin_key: str
    captures: Path  # its gateway.capture.dir
    adapters: Path  # a folder inside its gateway.adapter_dirs, for the retrained router
    model_path: str
    max_pixels: int | None

    @classmethod
    def of(cls, config: DeploymentConfig, base_url: str, adapters: Path) -> LoopTarget:
        if config.capture_path is None or not config.gateway.admin_enabled:
            raise CommandError("the loop needs gateway.capture.dir and gateway.admin_api_key set")
        return cls(base_url, base_url.removesuffix("/v1"), config.engine.api_key, config.gateway.admin_api_key,
                   config.capture_path, adapters, config.model.path, config.engine.max_pixels)


@dataclass
class Routed:
    """One auto request: the truth, where it went, how it ended."""

    stage: str
    label: str
    expert: str | None
    request_id: str | None
    status: int | str
    seconds: float

    @property
    def right(self) -> bool:
        return self.expert == self.label


@dataclass
class LoopMetrics:
    """What the loop measured. Accuracies are routed accuracies through `auto`."""

    family: str
    traffic_accuracy: float  # the live router on the family's traffic
    labelled: dict[str, int]  # labelled captures by how: feedback (wrong routes), review (random captures)
    captured: int  # items in the store when exported
    exported: dict[str, Any]  # the captures the export wrote, per split and label
    base_train: int  # base training lines beside them
    train_s: float
    candidate: str
    shadow: dict[str, Any]  # GET /admin/router/shadow just before the promotion
    family_before: float  # the fresh set of the family, live router
    family_after: float  # ... promoted router
    in_distribution_before: float
    in_distribution_after: float
    in_distribution_flips: dict[str, int]  # the same screenshots: right before, wrong after ("lost"), and the reverse
    requests: int  # every call made: auto, feedback, admin
    failed: list[dict[str, Any]]
    latency: Percentiles  # auto requests
    stages_s: dict[str, float]


class _Caller:
    """The callers and the operator: auto requests, feedback, admin calls; every outcome recorded."""

    def __init__(self, session: aiohttp.ClientSession, target: LoopTarget, concurrency: int) -> None:
        self.session, self.target = session, target
        self.limit = asyncio.Semaphore(concurrency)
        self.routed: list[Routed] = []
        self.calls = 0
        self.failed: list[dict[str, Any]] = []
        self.told = 0  # feedback sent on wrong routes

    async def route_all(self, stage: str, screens: list[tuple[str, str]], tell: int = 0) -> list[Routed]:
        """Each (data URL, label) through auto; with `tell`, the caller says at once that a route is wrong, with
        the right expert, until it has said so `tell` times."""
        return list(await asyncio.gather(*(self._one(stage, url, label, tell) for url, label in screens)))

    async def admin(self, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
        return await self._call(method, self.target.root_url + path, body, bearer_headers(self.target.admin_key))

    async def _one(self, stage: str, url: str, label: str, tell: int) -> Routed:
        body = {"model": "auto", "max_tokens": 1, "temperature": 0,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
        async with self.limit:
            started = time.perf_counter()
            self.calls += 1
            try:
                async with self.session.post(self.target.base_url + "/chat/completions", json=body,
                                             headers=bearer_headers(self.target.api_key)) as r:
                    text = await r.text()
                    routed = Routed(stage, label, r.headers.get("x-route-expert"), r.headers.get("x-request-id"),
                                    r.status, time.perf_counter() - started)
            except (aiohttp.ClientError, TimeoutError) as exc:
                text, routed = repr(exc), Routed(stage, label, None, None, type(exc).__name__,
                                                 time.perf_counter() - started)
        self.routed.append(routed)
        if routed.status != 200:
            self.failed.append({"call": f"auto ({stage})", "status": routed.status, "answer": text[:300]})
        elif not routed.right and self.told < tell:
            self.told += 1
            await self._call("POST", self.target.base_url + "/feedback",
                             {"request_id": routed.request_id, "correct": False, "expert": label},
                             bearer_headers(self.target.api_key))
        return routed

    async def _call(self, method: str, url: str, body: dict | None, headers: dict[str, str]) -> dict[str, Any]:
        self.calls += 1
        async with self.session.request(method, url, json=body, headers=headers) as r:
            answer = await r.json()
        if r.status != 200:
            self.failed.append({"call": f"{method} {url}", "status": r.status, "answer": json.dumps(answer)[:300]})
            raise CommandError(f"{method} {url} answered {r.status}: {json.dumps(answer)[:300]}")
        return answer


def _screens(labels: list[str], per_class: int, seed: int, family: str | None, max_pixels: int | None
             ) -> list[tuple[str, str]]:
    """Screenshots as data URLs with their true label, the classes interleaved."""
    return [(prepare_image(generate(label, seed + n, family=family).image, max_pixels=max_pixels).data_url, label)
            for n in range(per_class) for label in labels]


def _accuracy(routed: list[Routed]) -> float:
    return round(sum(r.right for r in routed) / len(routed), 4)


def _flips(before: list[Routed], after: list[Routed]) -> dict[str, int]:
    """Screenshots routed right before and wrong after ("lost"), and wrong before and right after ("won")."""
    pairs = [(b.right, a.right) for b, a in zip(before, after, strict=True)]
    return {"lost": sum(b and not a for b, a in pairs), "won": sum(a and not b for b, a in pairs)}


def review(store: CaptureStore, truth: dict[str, str], most: int) -> int:
    """A reviewer in Label Studio: the exported tasks, the unlabelled ones annotated with the truth until `most`
    captures are labelled in all, imported back; how many were labelled."""
    tasks = label_studio_tasks(store)
    room = most - sum(1 for t in tasks if t.get("annotations"))
    annotated = []
    for task in tasks:
        capture_id = task["data"]["capture_id"]
        if room > 0 and not task.get("annotations") and capture_id in truth:
            annotated.append({**task, "annotations": [{"result": [choice_result(truth[capture_id])]}]})
            room -= 1
    return len(import_labels(store, annotated))


def train_router(model_path: str, config: LoopConfig, recipe: str, data: Path, base: Path, out: Path,
                 *more: str) -> float:
    """Train a router with the trainer on the routing dataset `data` (validated on `base`'s held-out lines);
    seconds it took."""
    started = time.perf_counter()
    code = train_cli(["--config", str(config.router_recipe), "--model_name_or_path", model_path,
                      "--data_path", str(data / "train-classification.jsonl"),
                      "--eval_data_path", str(base / "eval-classification.jsonl"), "--output_dir", str(out),
                      "--overwrite_output_dir", "True", "--disable_tqdm", "True", *RECIPES[recipe], *more])
    if code:
        raise CommandError(f"training the router into {out} failed (exit {code})")
    return time.perf_counter() - started


async def run_loop(target: LoopTarget, base: Path, config: LoopConfig, work: Path) -> LoopMetrics:
    """The whole loop on `target`, whose live router was trained on the routing dataset `base` (its labels are the
    classes); the promoted router stays live."""
    stages: dict[str, float] = {}
    clock = time.perf_counter()

    def stage(name: str) -> None:
        nonlocal clock
        stages[name] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()
        log.info("learning loop: %s done in %.0f s", name, stages[name])

    labels = json.loads((base / "dataset.json").read_text())["classes"]
    pixels = target.max_pixels
    traffic = _screens(labels, config.traffic_per_class, _TRAFFIC_SEED, config.family, pixels)
    fresh = _screens(labels, config.test_per_class, _FRESH_SEED, config.family, pixels)
    today = _screens(labels, config.test_per_class, _IN_DISTRIBUTION_SEED, None, pixels)
    store = CaptureStore(target.captures, max_items=1 << 62, max_age_s=float("inf"), max_bytes=1 << 62)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        caller = _Caller(session, target, config.concurrency)
        live = (await caller.admin("GET", "/admin/state"))["router"]
        if live is None or live.get("labels") != labels:
            raise CommandError(f"the live router's labels {live and live.get('labels')} are not the base data's "
                               f"classes {labels}")
        routed = await caller.route_all("traffic", traffic, tell=config.labelled)
        stage("traffic and feedback")

        reviewed = await asyncio.to_thread(review, store, {r.request_id: r.label for r in routed if r.request_id},
                                           config.labelled)
        data = work / "data"
        exported = await asyncio.to_thread(export, store, data, classes=labels, base=base, weight=config.weight,
                                           replay=config.replay_per_class if config.warm_start else None)
        await asyncio.to_thread(convert_dataset, data)
        captured = len(await asyncio.to_thread(store.items))
        folder = target.adapters / f"router-retrained-{secrets.token_hex(3)}"
        warm = (["--init_adapter", live["path"], "--num_train_epochs", str(config.warm_epochs)]
                if config.warm_start else [])
        train_s = await asyncio.to_thread(train_router, target.model_path, config, config.recipe, data, base, folder,
                                          *warm, *config.train_args)
        stage("review, export and retraining")

        candidate = (await caller.admin("POST", "/admin/router/candidate", {"path": str(folder)}))["candidate"]
        shadowed = [*await caller.route_all("before", fresh), *await caller.route_all("before", today)]

        async def shadow_done() -> bool:
            report = await caller.admin("GET", "/admin/router/shadow")
            scored = report["labelled"] or {"count": 0, "scored": 0, "failed": 0}
            sampled = math.floor(len(shadowed) * report["fraction"] + 1e-9)  # the sampler takes exactly that share
            return (report["compared"] + report["failed"] + report["skipped"] >= sampled
                    and scored["scored"] + scored["failed"] >= scored["count"])

        await until(shadow_done, "the shadow comparison to end")
        shadow = await caller.admin("GET", "/admin/router/shadow")
        stage("candidate and shadow")
        await caller.admin("POST", "/admin/router/promote")
        family_after = await caller.route_all("after", fresh)
        today_after = await caller.route_all("after", today)
        stage("promotion")
    return LoopMetrics(
        family=config.family, traffic_accuracy=_accuracy(routed),
        labelled={"feedback": caller.told, "review": reviewed}, captured=captured, exported=exported["captures"],
        base_train=exported["base_train"],
        train_s=round(train_s, 1), candidate=candidate["served_as"], shadow=shadow,
        family_before=_accuracy(shadowed[:len(fresh)]), family_after=_accuracy(family_after),
        in_distribution_before=_accuracy(shadowed[len(fresh):]), in_distribution_after=_accuracy(today_after),
        in_distribution_flips=_flips(shadowed[len(fresh):], today_after),
        requests=caller.calls, failed=caller.failed,
        latency=percentiles([r.seconds for r in caller.routed if r.status == 200]), stages_s=stages)


def markdown(metrics: LoopMetrics, config: LoopConfig) -> str:
    labelled = metrics.shadow.get("labelled") or {}
    score = (lambda who: (labelled.get(who) or {}).get("accuracy"))
    rows = [("the family's traffic (live router)", metrics.traffic_accuracy, None),
            (f"fresh {metrics.family} screenshots", metrics.family_before, metrics.family_after),
            ("fresh screenshots of today's looks", metrics.in_distribution_before, metrics.in_distribution_after),
            (f"labelled held-out captures ({labelled.get('scored', 0)}, shadow report)", score("live"),
             score("candidate"))]
    cell = (lambda v: "-" if v is None else f"{v:.3f}")
    return "\n".join([
        f"## The router learning from its traffic: {metrics.family}, a look it never saw", "",
        "| routed accuracy on | live router | promoted router |", "|---|---|---|",
        *[f"| {name} | {cell(before)} | {cell(after)} |" for name, before, after in rows], "",
        f"Labelled captures: {metrics.labelled['feedback']} from callers' feedback on wrong routes, "
        f"{metrics.labelled['review']} from review ({metrics.captured} captured); exported {metrics.exported}. "
        f"Retraining ({'from the live router' if config.warm_start else 'from scratch'}, {metrics.base_train} base "
        f"lines beside the captures x{config.weight}): {metrics.train_s:.0f} s. Requests: {metrics.requests}, "
        f"failed: {len(metrics.failed)}. Today's looks, screenshot by screenshot: "
        f"{metrics.in_distribution_flips['lost']} right before and wrong after, "
        f"{metrics.in_distribution_flips['won']} the reverse. "
        f"auto latency p50/p90/p99: {_ms(metrics.latency.p50)}/{_ms(metrics.latency.p90)}/{_ms(metrics.latency.p99)} "
        f"ms. Stages (s): {metrics.stages_s}.", ""])


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def plot(metrics: LoopMetrics, path: Path) -> None:
    """Live against promoted router, on the fresh family set and on today's looks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [f"fresh {metrics.family}", "today's looks"]
    before = [metrics.family_before, metrics.in_distribution_before]
    after = [metrics.family_after, metrics.in_distribution_after]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = range(len(groups))
    ax.bar([x - 0.2 for x in xs], before, width=0.4, label="live router")
    ax.bar([x + 0.2 for x in xs], after, width=0.4, label="promoted router (retrained on captures)")
    for x, b, a in zip(xs, before, after):
        ax.text(x - 0.2, b + 0.01, f"{b:.2f}", ha="center", fontsize=8)
        ax.text(x + 0.2, a + 0.01, f"{a:.2f}", ha="center", fontsize=8)
    ax.set_xticks(list(xs), groups)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("routed accuracy through auto")
    ax.set_title(f"{sum(metrics.labelled.values())} labelled captures of {metrics.family}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(metrics: LoopMetrics, config: LoopConfig, setup: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    loop = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()}
    (out / JSON_NAME).write_text(json.dumps({"setup": {**setup, "loop": loop}, **dataclasses.asdict(metrics)},
                                            indent=1) + "\n")
    (out / MARKDOWN_NAME).write_text(markdown(metrics, config))
    plot(metrics, out / PNG_NAME)


@dataclass
class LoopArguments(DeploymentArguments):
    """The flags of `python -m benchmarks.learning_loop`."""

    work: Path = field(default=Path("runs/learning-loop"), metadata={
        "help": "Folder for the base data, the routers and the capture store (emptied first)."})
    out: Path | None = field(default=None, metadata={
        "help": "Output folder (default: benchmarks/results/<stamp>-learning-loop)."})


def learning_loop(args: LoopArguments, config: LoopConfig) -> int:
    from benchmarks.quickstart import make_dataset
    from benchmarks.runner import default_out_dir

    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    plain = args.deployment()
    base = make_dataset(plain, work, config.base_per_class, config.test_per_class, name="base", seed=0)
    live = work / "routers" / "live"
    log.info("training the live router on the base data (the main job's recipe) ...")
    train_router(plain.model.path, config, "lm", base, base, live)
    admin_key = secrets.token_urlsafe(16)
    deployment = args.deployment(
        "engine.port=0", "engine.tower_lora=true", "engine.lora_headroom=2", f"router.path={live}",
        f"gateway.admin_api_key={admin_key}", "gateway.shadow_fraction=1.0", f"gateway.adapter_dirs=[{work}]",
        # Its own state file: the config's would make the next `serve` of it come back with this run's routers.
        f"gateway.state_file={work / 'deployment.state.json'}",
        f"gateway.capture={{dir: {work / 'captures'}, fraction: {config.fraction}, recent: 4096}}")
    out = args.out or default_out_dir("-learning-loop")
    server = ServerProcess(deployment, work / "vllm.log")

    async def play() -> LoopMetrics:
        served = await server.start()
        return await run_loop(LoopTarget.of(deployment, served.base_url, work / "routers"), base, config, work)

    try:
        metrics = asyncio.run(play())
    finally:
        server.stop()
    write_report(metrics, config, {"config": str(args.config), "overrides": args.overrides,
                                   "model": deployment.model.path, "experts": list(deployment.labels)}, out)
    print(markdown(metrics, config))
    log.info("wrote %s", out)
    return 0 if not metrics.failed else 1


def main(argv: list[str] | None = None) -> int:
    args, config = parse_command([LoopArguments, LoopConfig], argv, prog="python -m benchmarks.learning_loop",
                                 description=__doc__, yaml_option=False)
    return run_command(lambda: learning_loop(args, config))


if __name__ == "__main__":
    raise SystemExit(main())
