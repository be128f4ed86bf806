"""From the gateway's capture store (lora_router.capture) to router training data, and to and from Label Studio.

    python -m training.captures export --store CAPTURES --out DIR [--base ROUTING_DIR --weight 3]
    python -m training.captures label-studio --store CAPTURES --out tasks.json
    python -m training.captures import-labels --store CAPTURES --tasks export.json

export: the labelled captures (a reviewer's label, or feedback that named the right expert or confirmed the route)
as a routing dataset in the seed's format: images/, train.jsonl, eval.jsonl (a held-out share of the captures,
chosen by id so an item keeps its split as the store grows) and dataset.json, which
`training.convert_routing_to_classification` turns into router training data. Each line's metadata.family is
"captured", so `training.family_accuracy` reports the captured held-out set apart. With `--base` (a routing dataset
made by `training.generate_dataset`), the base data comes first in both files and the captured training lines are
repeated `--weight` times: captures are few next to the base data; `--replay N` keeps N base training lines per
class, for a router retrained from the live one. `classes/<label>/captures.jsonl` holds each
label's captures as an expert dataset folder, usable as `--<label>-dataset` by `training.generate_dataset`.

label-studio: every capture as a Label Studio task (image as a data URL, the router's route as a pre-annotation
with its confidence); import-labels: the choices of an exported Label Studio project back into the store as labels.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lora_router.capture import HELD_OUT_FRACTION, CaptureItem, CaptureStore, held_out
from lora_router.configuration import CommandError, ConfigError, check_types, parse_command, run_command
from lora_router.jsonl import read_jsonl, write_jsonl
from training.generate_dataset import folder_written_whole

log = logging.getLogger(__name__)

ACTIONS = ("export", "label-studio", "import-labels")
FAMILY = "captured"
# Label Studio's names for the control and the object of the labelling config (LABEL_CONFIG).
_FROM, _TO = "expert", "image"


@dataclass
class CapturesArguments:
    """The flags of `python -m training.captures`."""

    action: str = field(metadata={"help": f"What to do: {', '.join(ACTIONS)}.", "choices": list(ACTIONS)})
    store: Path = field(metadata={"help": "The capture store's folder (gateway.capture.dir)."})
    out: Path | None = field(default=None, metadata={
        "help": "export: the dataset folder to write (must not exist or be empty); label-studio: the tasks file."})
    tasks: Path | None = field(default=None, metadata={"help": "import-labels: Label Studio's JSON export."})
    base: Path | None = field(default=None, metadata={
        "help": "export: a routing dataset (training.generate_dataset) to merge the captures into; its classes are "
                "the labels."})
    weight: int = field(default=1, metadata={
        "help": "export with --base: times each captured training line is repeated next to the base data."})
    replay: int | None = field(default=None, metadata={
        "help": "export with --base: at most this many base training lines per class (a seeded sample; default all): "
                "a router retrained from the live one (the trainer's --init_adapter) needs only a reminder of the "
                "base data beside the captures."})
    eval_fraction: float = field(default=HELD_OUT_FRACTION, metadata={
        "help": "export: share of the captures held out (the gateway's shadow report scores routers on the "
                "labelled ones of the default share)."})
    classes: str | None = field(default=None, metadata={
        "help": "export: the labels in order, comma-separated (default: --base's classes, else the labels found)."})

    def __post_init__(self) -> None:
        check_types(self)
        needs = {"export": "out", "label-studio": "out", "import-labels": "tasks"}[self.action]
        if getattr(self, needs) is None:
            raise ConfigError(f"{self.action} needs --{needs}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.weight < 1:
            raise ConfigError(f"weight must be >= 1, got {self.weight}")
        if self.replay is not None and (self.replay < 0 or self.base is None):
            raise ConfigError(f"replay must be >= 0 and needs --base, got {self.replay}")
        if not self.store.is_dir():
            raise ConfigError(f"no capture store at {self.store}")


def export(store: CaptureStore, out: Path, *, classes: list[str] | None = None, base: Path | None = None,
           weight: int = 1, replay: int | None = None, eval_fraction: float = HELD_OUT_FRACTION) -> dict:
    """Write the labelled captures as a routing dataset (see the module docstring); what dataset.json says."""
    base_meta = json.loads((base / "dataset.json").read_text()) if base else None
    labelled = [i for i in store.items().values() if i.label is not None]
    classes = classes or (base_meta["classes"] if base_meta else sorted({i.label for i in labelled}))
    strangers = sorted({i.label for i in labelled} - set(classes))
    if strangers:
        raise CommandError(f"captures are labelled {', '.join(strangers)}, which the classes "
                           f"({', '.join(classes)}) do not name")
    with folder_written_whole(out) as work:
        (work / "images").mkdir()
        train, evaluation = [], []
        for item in labelled:
            image = f"images/captured-{item.id}.png"
            shutil.copyfile(store.folder / item.image, work / image)
            line = _line(item, image, classes)
            (evaluation if held_out(item.id, eval_fraction) else train).append(line)
        for label in classes:
            mine = [{**line, "image": f"../../{line['image']}"} for line in train + evaluation
                    if line["adapter"] == label]
            if mine:
                (work / "classes" / label).mkdir(parents=True)
                write_jsonl(work / "classes" / label / "captures.jsonl", mine)
        base_train = base_eval = []
        if base:
            base_train = _sample([_rebased(line, base) for line in read_jsonl(base / "train.jsonl")], replay)
            base_eval = [_rebased(line, base) for line in read_jsonl(base / "eval.jsonl")]
        write_jsonl(work / "train.jsonl", base_train + train * weight)
        write_jsonl(work / "eval.jsonl", base_eval + evaluation)
        meta = {"classes": classes, "captures": {"train": dict(Counter(line["adapter"] for line in train)),
                                                 "eval": dict(Counter(line["adapter"] for line in evaluation)),
                                                 "unlabelled": len(store.items()) - len(labelled)},
                "base": str(base) if base else None, "base_train": len(base_train), "weight": weight,
                "eval_fraction": eval_fraction,
                "store": str(store.folder)}
        (work / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _sample(lines: list[dict], per_class: int | None) -> list[dict]:
    """At most `per_class` lines of each class, drawn with a fixed seed, in their order; all with None."""
    if per_class is None:
        return lines
    by_class: dict[str, list[int]] = {}
    for n, line in enumerate(lines):
        by_class.setdefault(line["adapter"], []).append(n)
    rng = random.Random(0)
    kept = {n for indices in by_class.values() for n in rng.sample(indices, min(per_class, len(indices)))}
    return [line for n, line in enumerate(lines) if n in kept]


def _line(item: CaptureItem, image: str, classes: list[str]) -> dict:
    return {"id": f"captured-{item.id}", "image": image, "adapter": item.label, "label": classes.index(item.label),
            "metadata": {"task_type": item.label, "family": FAMILY, "routed": item.expert, "router": item.router,
                         "confidence": item.confidence, "reasons": item.reasons}}


def _rebased(line: dict, base: Path) -> dict:
    """A base dataset line whose image path still resolves from the exported folder."""
    return {**line, "image": str((base / line["image"]).resolve())}


def label_studio_tasks(store: CaptureStore) -> list[dict]:
    """Every capture as a Label Studio task: the screenshot inline, the route as a pre-annotation, a set label as
    an annotation."""
    tasks = []
    for item in store.items().values():
        data_url = "data:image/png;base64," + base64.b64encode(store.png(item)).decode()
        task = {"data": {"image": data_url, "capture_id": item.id},
                "predictions": [{"model_version": item.router or "", "score": item.confidence,
                                 "result": [choice_result(item.expert)]}]}
        if item.label is not None:
            task["annotations"] = [{"result": [choice_result(item.label)]}]
        tasks.append(task)
    return tasks


def import_labels(store: CaptureStore, tasks: list[dict]) -> dict[str, str]:
    """Each task's latest annotated choice as its capture's label; {capture id: label}. A task of no capture in the
    store is an error naming it, and nothing is changed."""
    labels = {}
    for number, task in enumerate(tasks):
        capture_id = (task.get("data") or {}).get("capture_id")
        choices = [r["value"]["choices"][0] for a in task.get("annotations") or [] for r in a.get("result") or []
                   if r.get("from_name") == _FROM and (r.get("value") or {}).get("choices")]
        if capture_id is None:
            raise CommandError(f"task {number} has no data.capture_id: not exported by training.captures")
        if choices:
            labels[capture_id] = choices[-1]
    missing = sorted(set(labels) - set(store.items()))
    if missing:
        raise CommandError(f"no captured item for task(s) {', '.join(missing)}; nothing imported")
    for capture_id, label in labels.items():
        store.update(capture_id, label=label)
    return labels


# The labelling config to paste into a Label Studio project for these tasks.
LABEL_CONFIG = f"""<View>
  <Image name="{_TO}" value="$image"/>
  <Choices name="{_FROM}" toName="{_TO}" choice="single"><!-- one <Choice value="..."/> per expert --></Choices>
</View>"""


def choice_result(label: str) -> dict:
    """A Label Studio result choosing `label`."""
    return {"from_name": _FROM, "to_name": _TO, "type": "choices", "value": {"choices": [label]}}


def run(args: CapturesArguments) -> int:
    # The bounds do not matter to a reader: nothing is added here.
    store = CaptureStore(args.store, max_items=1 << 62, max_age_s=float("inf"), max_bytes=1 << 62)
    if args.action == "export":
        classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
        meta = export(store, args.out, classes=classes, base=args.base, weight=args.weight, replay=args.replay,
                      eval_fraction=args.eval_fraction)
        log.info("wrote %s: captures %s train, %s eval (%d unlabelled left out)", args.out, meta["captures"]["train"],
                 meta["captures"]["eval"], meta["captures"]["unlabelled"])
    elif args.action == "label-studio":
        tasks = label_studio_tasks(store)
        args.out.write_text(json.dumps(tasks) + "\n")
        log.info("wrote %d tasks to %s; the project's labelling config:\n%s", len(tasks), args.out, LABEL_CONFIG)
    else:
        labels = import_labels(store, json.loads(args.tasks.read_text()))
        log.info("labelled %d captures from %s", len(labels), args.tasks)
    return 0


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_command(CapturesArguments, argv, prog="python -m training.captures", description=__doc__,
                            positional=("action",))
    return run_command(lambda: run(args), runtime_errors=(FileExistsError,))


if __name__ == "__main__":
    raise SystemExit(main())
