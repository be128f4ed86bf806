"""The router learning from labelled captures: its accuracy on a style family it never saw, against how many
captured screenshots of that family were labelled and exported into its training data (issue 25).

    python -m benchmarks.learning_curve [--family classic] [--captures 0 60 120 240] [--recipes lm tower]
                                        [--weight 3] [--out benchmarks/results/<date>-learning-curve]

The captures are what the gateway would have stored and a reviewer (or the callers' feedback) labelled: screenshots
of `--family` (a held-out look the generators never draw for training) in a capture store, prepared as the gateway
prepares them. For each recipe and count k, the first k (k/classes per class) are exported with
`training.captures export --base` into the base routing data (the main job's: 300 screenshots per class, today's
mix), each repeated `--weight` times; the router is trained from scratch on that with the trainer, then validated
in-process on a fresh set of the family (other seeds than any capture) and on in-distribution screenshots. Recipes:
`lm` the main job's (configs/training/router-tiny.yaml), `tower` the same with LoRA on the vision tower too.

Writes learning-curve.json (setup and every point), learning-curve.png and learning-curve.md to --out.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.quickstart import make_dataset
from benchmarks.runner import default_out_dir
from lora_router.capture import CaptureItem, CaptureStore
from lora_router.configuration import CommandError, ConfigError, check_types, parse_command, run_command
from lora_router.deployment import DeploymentArguments
from lora_router.images import prepare_image
from lora_router.resources import configs_dir
from training.captures import export
from training.convert_routing_to_classification import convert_dataset
from training.generate_dataset import RoutingDatasetConfig, generate_routing_dataset
from training.screens import generate
from training.screens.styles import FAMILIES
from training.train_qwen import main as train_cli
from training.validate_router import validate

log = logging.getLogger(__name__)

RECIPES = {"lm": [], "tower": ["--lora_target_modules", "all-linear", "--lora_vision_tower", "True"]}
# Seeds of the captured screens: far from the test set's (generate_dataset's routing-eval seeds) and the base's.
_CAPTURE_SEED = 500_000


@dataclass
class CurveArguments(DeploymentArguments):
    """The flags of `python -m benchmarks.learning_curve`."""

    family: str = field(default="classic", metadata={"help": "The style family the captures and the test set are in."})
    captures: list[int] = field(default_factory=lambda: [0, 60, 120, 240], metadata={
        "help": "Labelled captures exported into the training data, one router per count (multiples of the classes)."})
    recipes: list[str] = field(default_factory=lambda: ["lm", "tower"], metadata={
        "help": f"Router recipes: {', '.join(RECIPES)}."})
    weight: int = field(default=3, metadata={"help": "Times each captured line is repeated next to the base data."})
    base_per_class: int = field(default=300, metadata={"help": "Base routing screenshots per class (today's mix)."})
    test_per_class: int = field(default=40, metadata={"help": "Test screenshots per class, family and in-distribution."})
    recipe: Path = field(default=configs_dir() / "training" / "router-tiny.yaml", metadata={
        "help": "The router's trainer YAML."})
    work: Path = field(default=Path("runs/learning-curve"), metadata={"help": "Folder for data and routers."})
    out: Path | None = field(default=None, metadata={
        "help": "Folder for the results (default: benchmarks/results/<date>-learning-curve)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_types(self)
        if self.family not in FAMILIES:
            raise ConfigError(f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        unknown = sorted(set(self.recipes) - set(RECIPES))
        if unknown:
            raise ConfigError(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(RECIPES)}")
        if any(k < 0 for k in self.captures) or self.weight < 1:
            raise ConfigError("captures must be >= 0 and weight >= 1")


@dataclass
class CurvePoint:
    """One router: its recipe, the captures in its data, and its accuracy on the family and in distribution."""

    recipe: str
    captures: int
    family_accuracy: float
    in_distribution_accuracy: float
    train_lines: int
    seconds: float


def captured_store(folder: Path, labels: list[str], family: str, per_class: int, max_pixels: int | None) -> None:
    """A capture store holding `per_class` labelled screenshots of each label in `family`, interleaved by class."""
    store = CaptureStore(folder, max_items=1 << 30, max_age_s=float("inf"), max_bytes=1 << 62)
    for n in range(per_class):
        for label in labels:
            image = prepare_image(generate(label, _CAPTURE_SEED + n, family=family).image, max_pixels=max_pixels)
            png = image.png
            store.add(CaptureItem(id=f"{label}-{n:04d}", captured_at=time.time(), router=None, expert=label,
                                  confidence=0.0, probabilities={}, fallback=None, reasons=["feedback"],
                                  size=len(png), label=label), png)


def first_captures(source: Path, folder: Path, count: int) -> CaptureStore:
    """A store with the first `count` items of `source` (which interleaves the classes)."""
    shutil.rmtree(folder, ignore_errors=True)
    everything = CaptureStore(source, max_items=1 << 30, max_age_s=float("inf"), max_bytes=1 << 62)
    store = CaptureStore(folder, max_items=1 << 30, max_age_s=float("inf"), max_bytes=1 << 62)
    for item in list(everything.items().values())[:count]:
        store.add(item, everything.png(item))
    return store


def run(args: CurveArguments, out: Path) -> list[CurvePoint]:
    """Every point, the results rewritten in `out` after each (a long run can be read, or stopped, midway)."""
    config = args.deployment()
    labels = list(config.labels)
    if any(k % len(labels) for k in args.captures):
        raise ConfigError(f"captures must be multiples of the {len(labels)} classes, got {args.captures}")
    work = args.work
    base = make_dataset(config, work, args.base_per_class, args.test_per_class, name="base", seed=0)
    family_test = work / "family-test"
    shutil.rmtree(family_test, ignore_errors=True)
    generate_routing_dataset(RoutingDatasetConfig(classes=tuple(labels), train_images={c: 0 for c in labels},
                                                  eval_images=args.test_per_class, eval_families=(args.family,),
                                                  output=family_test, seed=7))
    convert_dataset(family_test)
    source = work / "captured-all"
    shutil.rmtree(source, ignore_errors=True)
    captured_store(source, labels, args.family, max(args.captures) // len(labels), config.engine.max_pixels)
    points = []
    for recipe in args.recipes:
        for count in args.captures:
            started = time.perf_counter()
            name = f"{recipe}-{count}"
            store = first_captures(source, work / f"captures-{name}", count)
            data = work / f"data-{name}"
            shutil.rmtree(data, ignore_errors=True)
            export(store, data, classes=labels, base=base, weight=args.weight, eval_fraction=0.0)
            convert_dataset(data)
            router = work / f"router-{name}"
            code = train_cli(["--config", str(args.recipe), "--model_name_or_path", config.model.path,
                              "--data_path", str(data / "train-classification.jsonl"),
                              "--eval_data_path", str(base / "eval-classification.jsonl"),
                              "--output_dir", str(router), "--overwrite_output_dir", "True", *RECIPES[recipe]])
            if code:
                raise CommandError(f"training {router} failed (exit {code})")
            on_family = validate(family_test / "eval-classification.jsonl", work / f"validate-{name}-family",
                                 adapter=router, quiet=True)
            in_dist = validate(base / "eval-classification.jsonl", work / f"validate-{name}-in-distribution",
                               adapter=router, quiet=True)
            lines = sum(1 for _ in (data / "train-classification.jsonl").open())
            point = CurvePoint(recipe, count, round(on_family["accuracy"], 4), round(in_dist["accuracy"], 4), lines,
                               round(time.perf_counter() - started, 1))
            log.info("%s: %d captures -> family %s %.3f, in distribution %.3f (%d training lines, %.0f s)", recipe,
                     count, args.family, point.family_accuracy, point.in_distribution_accuracy, lines, point.seconds)
            points.append(point)
            write_results(args, points, out)
    return points


def write_results(args: CurveArguments, points: list[CurvePoint], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    setup = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items()}
    (out / "learning-curve.json").write_text(json.dumps({"setup": setup, "points": [asdict(p) for p in points]},
                                                        indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for recipe in dict.fromkeys(p.recipe for p in points):
        mine = [p for p in points if p.recipe == recipe]
        ax.plot([p.captures for p in mine], [p.family_accuracy for p in mine], marker="o",
                label=f"{recipe}: {args.family}")
        ax.plot([p.captures for p in mine], [p.in_distribution_accuracy for p in mine], marker=".", linestyle=":",
                label=f"{recipe}: in distribution")
    ax.set_xlabel(f"labelled captures of {args.family} (each x{args.weight} in the training data)")
    ax.set_ylabel("routed accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "learning-curve.png", dpi=120)
    rows = [f"| {p.recipe} | {p.captures} | {p.family_accuracy:.3f} | {p.in_distribution_accuracy:.3f} | "
            f"{p.train_lines} | {p.seconds:.0f} |" for p in points]
    (out / "learning-curve.md").write_text(
        f"Router accuracy on {args.family} (never drawn for training) against labelled captures of it, each "
        f"repeated {args.weight}x beside {args.base_per_class} base screenshots per class; {args.test_per_class} test "
        f"screenshots per class.\n\n| recipe | captures | {args.family} | in distribution | training lines | s |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_command(CurveArguments, argv, prog="python -m benchmarks.learning_curve", description=__doc__,
                            yaml_option=False)

    def work() -> int:
        out = args.out or default_out_dir("-learning-curve")
        run(args, out)
        log.info("wrote %s", out)
        return 0

    return run_command(work)


if __name__ == "__main__":
    raise SystemExit(main())
