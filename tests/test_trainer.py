"""The trainer (transformers.Trainer + PEFT): the seed's flags verbatim, config precedence, precision messages, bad
inputs, and tiny runs (a YAML recipe's learning rate, checkpoint pruning, resume, manifest, a servable adapter,
gradient checkpointing, a warm start from another adapter)."""

from __future__ import annotations

import json
import logging
import shlex
import shutil
from pathlib import Path

import pytest
from transformers import TrainerCallback

from lora_router.configuration import ConfigError
from lora_router.manifest import MANIFEST_NAME
from lora_router.prompts import ROUTER_USER_PROMPT, router_system_prompt
from training.llava_data import DataError
from training.train_qwen import main
from training.trainer.args import ModelArguments, parse_args, resolve_base_dtype, resolve_precision
from training.trainer.run import train

SEED_COMMAND = """
--model_name_or_path tiny --data_path data/train.jsonl --eval_data_path data/eval.jsonl --output_dir out/router
--num_train_epochs 3 --per_device_train_batch_size 4 --per_device_eval_batch_size 8
--gradient_accumulation_steps 2 --evaluation_strategy "epoch" --save_strategy "epoch" --save_total_limit 2
--learning_rate 2e-4 --weight_decay 0.01 --warmup_ratio 0.03 --lr_scheduler_type "cosine" --logging_steps 10
--bf16 True --tf32 True --gradient_checkpointing True --dataloader_num_workers 2 --report_to "tensorboard"
"""
PATHS = ["--data_path", "d.jsonl", "--output_dir", "out"]
LABELS = ["calendar", "claim-window", "provider-select"]
# Tiny images and pixel limits: a handful of image tokens, so a run takes seconds on the random base.
TINY_PIXELS = ["--min_pixels", str(32 * 32 * 2), "--max_pixels", str(32 * 32 * 4)]


def _exit_code(argv: list[str]) -> int:
    """main()'s exit status; a bad flag ends it through argparse (SystemExit 2), as `python -m` would."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def test_the_seed_command_parses_verbatim():
    import torch

    model, data, args = parse_args(shlex.split(SEED_COMMAND))
    assert (model.model_name_or_path, data.data_path, data.eval_data_path, args.output_dir) == (
        "tiny", "data/train.jsonl", "data/eval.jsonl", "out/router")
    assert (args.num_train_epochs, args.per_device_train_batch_size, args.per_device_eval_batch_size,
            args.gradient_accumulation_steps) == (3.0, 4, 8, 2)
    assert (args.eval_strategy, args.save_strategy, args.save_total_limit) == ("epoch", "epoch", 2)
    assert (args.learning_rate, args.weight_decay, args.lr_scheduler_type) == (2e-4, 0.01, "cosine")
    assert args.warmup_ratio == args.warmup_steps == 0.03  # transformers 5 reads warmup_steps < 1 as a ratio
    assert (args.logging_steps, args.dataloader_num_workers, args.report_to) == (10, 2, ["tensorboard"])
    assert args.gradient_checkpointing is True and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    if not torch.cuda.is_available():  # reported, then dropped: TrainingArguments itself raises for them on a CPU
        assert (args.bf16, args.tf32) == (False, None) and len(args.precision_notes) == 2


@pytest.mark.parametrize("argv, section, name, value", [
    (["--eval_strategy", "steps", "--eval_steps", "7"], 2, "eval_strategy", "steps"),
    (["--evaluation_strategy", "no"], 2, "eval_strategy", "no"),
    (["--gradient_checkpointing"], 2, "gradient_checkpointing", True),
    (["--gradient_checkpointing", "False"], 2, "gradient_checkpointing", False),
    (["--lora_target_modules", "q_proj,v_proj"], 0, "lora_target_modules", ["q_proj", "v_proj"]),
    (["--lora_target_modules", "q_proj", "v_proj"], 0, "lora_target_modules", ["q_proj", "v_proj"]),
    (["--lora_rank", "8"], 0, "lora_r", 8),
    (["--lora_target_modules", "All-Linear"], 0, "lora_target_modules", ["all-linear"]),
    (["--lora_vision_tower", "True"], 0, "lora_vision_tower", True),
    (["--max_pixels", "4096"], 0, "max_pixels", 4096),
])
def test_flag_forms(argv, section, name, value):
    assert getattr(parse_args([*PATHS, "--eval_data_path", "e.jsonl", *argv])[section], name) == value


def test_defaults_then_yaml_then_flags(tmp_path):
    yaml_path = tmp_path / "train.yaml"
    yaml_path.write_text("learning_rate: 2e-3\nlora_r: 8\nevaluation_strategy: 'no'\nnum_train_epochs: 5\n"
                         "bf16: false\nlora_target_modules: [q_proj, v_proj]\n")
    model, _, args = parse_args(["--config", str(yaml_path), *PATHS, "--lora_r", "4"])
    assert args.learning_rate == 0.002  # YAML (a string to PyYAML, a float to the flag) over the default
    assert model.lora_r == 4  # flag over YAML
    assert args.num_train_epochs == 5 and args.eval_strategy == "no"  # an alias works as a key
    assert model.lora_target_modules == ["q_proj", "v_proj"]
    assert args.weight_decay == 0.0 and model.lora_dropout == 0.05  # untouched defaults
    assert model.lora_alpha == 8  # derived from the final rank


def test_the_recipes_parse():
    recipes = Path(__file__).resolve().parents[1] / "configs" / "training"
    for recipe in sorted(recipes.glob("*.yaml")):
        model, _, args = parse_args(["--config", str(recipe), *PATHS])
        assert model.lora_r <= model.max_lora_rank and args.learning_rate > 0, recipe


def test_serving_limits_come_from_the_deployment_config(tmp_path):
    deployment = tmp_path / "deploy.yaml"
    deployment.write_text("engine:\n  max_lora_rank: 8\n  min_pixels: 4096\n  max_pixels: 65536\n")
    model = ModelArguments(serving_config=str(deployment), lora_r=8)
    assert (model.max_lora_rank, model.min_pixels, model.max_pixels) == (8, 4096, 65536)
    assert ModelArguments(serving_config=str(deployment), lora_r=8, max_pixels=32768).max_pixels == 32768
    assert ModelArguments().max_lora_rank == 16  # configs/tiny-cpu.yaml's engine.max_lora_rank
    assert ModelArguments(serving_config=None).max_lora_rank == 512  # vLLM's largest


@pytest.mark.parametrize("case, kwargs, message", [
    ("rank above the serving limit", {"lora_r": 64}, "lora_r=64 is above the serving limit max_lora_rank=16"),
    ("vision-tower target", {"lora_target_modules": ["q_proj", "qkv"]}, "vision-tower modules; pass "
     "--lora_vision_tower True"),
    ("all-linear beside names", {"lora_target_modules": ["all-linear", "q_proj"]}, "give it alone"),
    ("patch embedding", {"lora_target_modules": ["patch_embed"], "lora_vision_tower": True}, "patch_embed is a Conv3d"),
    ("not a vLLM rank limit", {"max_lora_rank": 24}, "max_lora_rank must be one of vLLM's ranks"),
    ("pixel limits reversed", {"min_pixels": 9000, "max_pixels": 4000}, "min_pixels 9000 exceeds max_pixels"),
])
def test_bad_model_settings_are_refused(case, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ModelArguments(**kwargs)


def test_a_vision_tower_adapter_warns_when_the_serving_config_would_refuse_it(tmp_path, caplog):
    deployment = tmp_path / "deploy.yaml"
    deployment.write_text("engine:\n  tower_lora: true\n")
    with caplog.at_level(logging.WARNING, logger="training.trainer"):
        ModelArguments(lora_target_modules=["all-linear"], lora_vision_tower=True, serving_config=str(deployment))
        assert not caplog.records
        ModelArguments(lora_target_modules=["all-linear"], lora_vision_tower=True)
    (record,) = caplog.records
    assert "tiny-cpu.yaml does not set engine.tower_lora" in record.getMessage()


def test_every_bad_model_setting_is_listed_at_once():
    with pytest.raises(ConfigError) as info:
        ModelArguments(lora_r=64, lora_target_modules=["all-linear", "linear_fc1"])
    assert all(part in str(info.value) for part in ("lora_r=64", "give it alone", "vision-tower modules"))


def _lora_modules(model_args: ModelArguments, tmp_path: Path) -> set[str]:
    """The module names the trainer's PEFT model puts LoRA on (the tiny random base: seconds)."""
    from training.tiny_model import resolve_base_model
    from training.trainer.args import TrainArguments
    from training.trainer.run import build_model

    model = build_model(resolve_base_model("tiny-random"), model_args, TrainArguments(output_dir=str(tmp_path)))
    return {n.split(".lora_A.")[0].removeprefix("base_model.model.model.") for n, _ in model.named_parameters()
            if ".lora_A." in n}


def test_all_linear_stays_on_the_language_model_unless_the_vision_tower_is_asked_for(tmp_path):
    language = ({f"language_model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "k_proj", "v_proj",
                                                                                         "o_proj")}
                | {f"language_model.layers.{i}.mlp.{m}" for i in range(2) for m in ("gate_proj", "up_proj", "down_proj")})
    assert _lora_modules(ModelArguments(lora_target_modules=["all-linear"]), tmp_path) == language  # no lm_head
    assert _lora_modules(ModelArguments(), tmp_path) == language  # the named default: the same modules
    vision = {f"visual.blocks.{i}.{m}" for i in range(2)
              for m in ("attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2")}
    mergers = {f"visual.{merger}.{m}" for merger in ("merger", "deepstack_merger_list.0", "deepstack_merger_list.1")
               for m in ("linear_fc1", "linear_fc2")}
    both = ModelArguments(lora_target_modules=["all-linear"], lora_vision_tower=True)
    assert _lora_modules(both, tmp_path) == language | vision | mergers  # PEFT's all-linear skips the Conv3d
    # Names: `proj` would also match the patch embedding's Conv3d, which vLLM cannot adapt; it is left out.
    named = ModelArguments(lora_target_modules=["q_proj", "proj"], lora_vision_tower=True)
    assert _lora_modules(named, tmp_path) == ({m for m in language if m.endswith("q_proj")}
                                              | {m for m in vision if m.endswith("attn.proj")})
    with pytest.raises(ConfigError, match="match no vision-tower module"):
        _lora_modules(ModelArguments(lora_target_modules=["q_proj"], lora_vision_tower=True), tmp_path)


@pytest.mark.parametrize("case, argv, message", [
    ("unknown strategy", ["--save_strategy", "sometimes"], "--save_strategy/--save-strategy: invalid choice"),
    ("unknown scheduler", ["--lr_scheduler_type", "exotic"], "--lr_scheduler_type/--lr-scheduler-type: invalid choice"),
    ("no epochs", ["--num_train_epochs", "0"], "num_train_epochs must be > 0"),
    ("no data", ["--output_dir", "out"], "--data_path is required"),
    ("warm-up twice", [*PATHS, "--warmup_ratio", "0.1", "--warmup_steps", "5"], "warmup_ratio or warmup_steps"),
])
def test_bad_flags_are_refused_with_status_2(capsys, case, argv, message):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv if "--output_dir" in argv else [*PATHS, *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_yaml_with_an_unknown_key_names_it(tmp_path, capsys):
    yaml_path = tmp_path / "train.yaml"
    yaml_path.write_text("learnin_rate: 0.1\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(yaml_path), *PATHS])
    assert "train.yaml: unknown setting(s) learnin_rate" in capsys.readouterr().err


def test_precision_flags_on_a_cpu_are_reported_and_ignored():
    bf16, tf32, notes = resolve_precision(True, True, cuda=False, bf16_supported=False)
    assert (bf16, tf32) == (False, None)
    assert any(n.startswith("--tf32 True ignored: TF32 is a CUDA matmul mode") for n in notes)
    assert any(n.startswith("--bf16 True ignored: bf16 mixed precision is used on CUDA GPUs only") for n in notes)
    assert resolve_precision(True, True, cuda=True, bf16_supported=True) == (True, True, [])
    with pytest.raises(ConfigError, match="this GPU does not support bfloat16"):
        resolve_precision(True, True, cuda=True, bf16_supported=False)


@pytest.mark.parametrize("requested, bf16, expected", [
    ("auto", True, "bfloat16"), ("auto", False, "float32"), ("float32", True, "float32"),
    ("float32", False, "float32"), ("bfloat16", True, "bfloat16")])
def test_the_frozen_base_is_bfloat16_when_training_in_bf16_unless_asked_otherwise(requested, bf16, expected):
    assert resolve_base_dtype(requested, bf16) == expected


def test_a_bfloat16_base_without_bf16_training_is_refused_before_training(capsys):
    with pytest.raises(ConfigError, match="--base_dtype bfloat16 needs bf16 training"):
        resolve_base_dtype("bfloat16", False)
    with pytest.raises(SystemExit) as exit_info:  # on a CPU --bf16 is dropped, so the base would be float32
        parse_args([*PATHS, "--bf16", "True", "--base_dtype", "bfloat16"])
    assert exit_info.value.code == 2 and "--base_dtype bfloat16 needs bf16 training" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args([*PATHS, "--base_dtype", "float16"])
    assert "base_dtype" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- tiny runs

def _write_router_data(folder: Path, per_class: int, labels=LABELS, name="train.jsonl") -> Path:
    """A classification set of tiny solid-colour images, one colour per class."""
    from PIL import Image

    colours = [(220, 40, 40), (40, 200, 60), (40, 70, 220), (200, 200, 40)]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(per_class):
        for k, label in enumerate(labels):
            image = f"images/{name}-{label}-{i}.png"
            shade = tuple(min(255, c + 5 * i) for c in colours[k])
            Image.new("RGB", (64, 64), shade).save(folder / image)
            lines.append({"id": f"{label}-{i}", "image": image, "conversations": [
                {"from": "system", "value": router_system_prompt(labels)},
                {"from": "human", "value": f"<image>\n{ROUTER_USER_PROMPT}"},
                {"from": "gpt", "value": label}]})
    path = folder / name
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tiny-data")
    return _write_router_data(folder, 4), _write_router_data(folder, 1, name="eval.jsonl")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """A recipe as configs/training writes them; `2e-3` is a string to PyYAML, so the flag's type must convert it."""
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text("model_name_or_path: tiny-random\nnum_train_epochs: 3\nper_device_train_batch_size: 4\n"
                    "evaluation_strategy: epoch\nsave_strategy: epoch\nlearning_rate: 2e-3\nlora_r: 4\n"
                    "lora_dropout: 0.1\nlogging_steps: 1\ndisable_tqdm: true\nmax_new_tokens: 4\n")
    return path


def _argv(recipe: Path, train_data: Path, evaluation: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(recipe), "--data_path", str(train_data), "--eval_data_path", str(evaluation),
            "--output_dir", str(out), *TINY_PIXELS, *extra]


def _adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def straight_run(recipe, tiny_data, tmp_path_factory):
    """3 epochs from the recipe without interruption, the seed's precision flags given, TensorBoard on, 2
    checkpoints kept; the log records kept."""
    out = tmp_path_factory.mktemp("straight") / "router"
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("training.trainer")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        metrics = train(*parse_args(_argv(recipe, *tiny_data, out, "--save_total_limit", "2", "--bf16", "True",
                                          "--tf32", "True", "--report_to", "tensorboard")))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    return out, metrics, [r.getMessage() for r in records]


def test_a_recipe_with_learning_rate_2e_3_trains(straight_run):
    out, metrics, _ = straight_run
    assert json.loads((out / "training_args.json").read_text())["learning_rate"] == 0.002
    first = json.loads((out / "checkpoint-9" / "trainer_state.json").read_text())["log_history"][0]
    assert first["step"] == 1 and first["learning_rate"] == pytest.approx(0.002)  # no warm-up: the peak rate
    assert metrics["global_step"] == 9 and metrics["loss_last"] < metrics["loss_first"]


def test_a_tiny_run_writes_a_servable_adapter_with_its_manifest(straight_run, tiny_data):
    from lora_router.deployment import from_dict
    from lora_router.manifest import AdapterManifest, file_sha256
    from serving.adapters import check_adapters
    from training.tiny_model import resolve_base_model

    out, metrics, logged = straight_run
    manifest = AdapterManifest.read(out)
    assert manifest.labels == LABELS and manifest.rank == 4 and manifest.vision_tower is False
    assert manifest.system_prompt == router_system_prompt(LABELS) and manifest.user_prompt == ROUTER_USER_PROMPT
    assert manifest.dataset_sha256 == file_sha256(tiny_data[0])
    assert manifest.base_model == resolve_base_model("tiny-random")
    assert {"eval_loss", "eval_accuracy", "eval_accuracy_per_class"} <= set(manifest.metrics)
    config = json.loads((out / "adapter_config.json").read_text())
    assert not config.get("modules_to_save") and not config.get("use_dora") and config["r"] == 4
    # The serving checks accept it (language-model LoRA only, right base, labels = experts).
    deployment = from_dict({"model": {"path": manifest.base_model},
                            "router": {"name": "router", "path": str(out)},
                            "experts": [{"name": n, "path": str(out)} for n in LABELS],
                            "engine": {"max_lora_rank": 8, "min_pixels": manifest.min_pixels,
                                       "max_pixels": manifest.max_pixels}})
    check_adapters(deployment, manifest.base_model)  # at the pixel limits it was trained at
    # Metrics: a loss curve with first and last values, one evaluation per epoch with the greedy accuracy.
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["loss_first"] == saved["loss_curve"][0][1] and saved["loss_last"] == saved["loss_curve"][-1][1]
    assert [e["epoch"] for e in saved["evaluations"]] == [1, 2, 3]
    assert all(set(e["eval_accuracy_per_class"]) == set(LABELS) and e["eval_count"] == 3 for e in saved["evaluations"])
    assert saved["final_eval"]["step"] == 9 and saved["train_wall_s"] > 0
    # Precision flags that cannot apply on a CPU were reported once, not fatal.
    assert sum("--tf32 True ignored" in line for line in logged) == 1
    assert sum("--bf16 True ignored" in line for line in logged) == 1
    # Log lines, not a bar: one per logged step, and the per-epoch accuracy.
    assert sum(line.startswith("step ") and '"loss"' in line for line in logged) == 9
    assert sum(line.startswith("eval at step ") for line in logged) == 3
    assert list((out / "runs").iterdir()), "TensorBoard event files"


def test_checkpoints_are_pruned_to_the_limit(straight_run):
    out, _, _ = straight_run
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-9"]


class _Stop(Exception):
    pass


class _StopAtStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise _Stop


def test_resume_from_the_last_checkpoint_gives_the_same_adapter(straight_run, recipe, tiny_data, tmp_path, capsys):
    import torch

    out = tmp_path / "router"
    # Interrupted mid epoch 2, after the epoch-1 checkpoint (step 3).
    with pytest.raises(_Stop):
        train(*parse_args(_argv(recipe, *tiny_data, out)), callbacks=[_StopAtStep(5)])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert _exit_code(_argv(recipe, *tiny_data, out)) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    metrics = train(*parse_args(_argv(recipe, *tiny_data, out, "--resume_from_checkpoint", "last")))
    assert metrics["global_step"] == 9
    # The resumed run's loss curve continues the interrupted one's (steps 1..9, no gap, no repeat).
    assert [s for s, _ in metrics["loss_curve"]] == list(range(1, 10))
    assert [e["step"] for e in metrics["evaluations"]] == [3, 6, 9]
    resumed, straight = _adapter_weights(out), _adapter_weights(straight_run[0])
    assert resumed.keys() == straight.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-4, atol=1e-6)


def _warm_model(init: Path, tmp_path: Path, **model_kwargs):
    from training.tiny_model import resolve_base_model
    from training.trainer.args import TrainArguments
    from training.trainer.run import build_model

    model_args = ModelArguments(init_adapter=str(init), lora_r=4, serving_config=None, **model_kwargs)
    return build_model(resolve_base_model("tiny-random"), model_args, TrainArguments(output_dir=str(tmp_path)))


def test_a_warm_start_begins_from_the_adapter_s_weights_and_new_modules_start_fresh(straight_run, tmp_path):
    from peft.utils import get_peft_model_state_dict

    saved = _adapter_weights(straight_run[0])
    same = get_peft_model_state_dict(_warm_model(straight_run[0], tmp_path))
    assert same.keys() == saved.keys() and all(same[k].equal(saved[k]) for k in saved)
    # With the vision tower too (the learning loop's recipe): the language model's LoRA as saved, the tower's fresh.
    wider = get_peft_model_state_dict(_warm_model(straight_run[0], tmp_path, lora_target_modules=["all-linear"],
                                                  lora_vision_tower=True))
    tower = [k for k in wider if ".visual." in k]
    assert tower and saved.keys() == wider.keys() - set(tower) and all(wider[k].equal(saved[k]) for k in saved)
    assert all(not wider[k].any() for k in tower if ".lora_B." in k)


def test_a_warm_start_from_an_adapter_that_does_not_fit_is_refused(straight_run, tmp_path):
    init = tmp_path / "init"
    shutil.copytree(straight_run[0], init, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    with pytest.raises(ConfigError, match=r"init_adapter .* has LoRA weights on \d+ modules this run does not adapt"):
        _warm_model(init, tmp_path, lora_target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="has lora_r=4, lora_alpha=8; this run trains lora_r=4, lora_alpha=16"):
        _warm_model(init, tmp_path, lora_alpha=16)
    manifest = json.loads((init / MANIFEST_NAME).read_text())
    (init / MANIFEST_NAME).write_text(json.dumps({**manifest, "base_model_fingerprint": "0" * 16}))
    with pytest.raises(ConfigError, match="was trained on another base model"):
        _warm_model(init, tmp_path)
    with pytest.raises(ConfigError, match="init_adapter .* is no PEFT adapter folder: no adapter_config.json or "
                                          "adapter_model.safetensors"):
        ModelArguments(init_adapter=str(tmp_path / "nothing"))


def test_gradient_checkpointing_accumulation_and_the_label_loss_train(recipe, tiny_data, tmp_path):
    out = tmp_path / "router"
    metrics = train(*parse_args(_argv(recipe, *tiny_data, out, "--gradient_checkpointing", "True",
                                      "--gradient_accumulation_steps", "2", "--label_loss_weight", "1.0",
                                      "--max_steps", "2", "--save_strategy", "no", "--eval_strategy", "no")))
    assert metrics["global_step"] == 2 and not list(out.glob("checkpoint-*"))
    # LoRA B starts at zero: non-zero B means gradients flowed through the checkpointed blocks.
    assert all(w.abs().sum() > 0 for k, w in _adapter_weights(out).items() if "lora_B" in k)


def _gpt_less(path: Path) -> None:
    lines = [json.loads(t) for t in path.read_text().splitlines()]
    lines[1]["conversations"] = lines[1]["conversations"][:2]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def _edit_line(key: str, value):
    def edit(path: Path) -> None:
        lines = [json.loads(t) for t in path.read_text().splitlines()]
        if key == "answer":
            lines[1]["conversations"][2]["value"] = value
        elif key == "human":
            lines[1]["conversations"][1]["value"] = value
        else:
            lines[1][key] = value
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return edit


BAD_INPUTS = [
    # (case, how the input is broken: an edit of line 2 of the training file, or extra flags; exit status, message)
    ("missing image", _edit_line("image", "images/nowhere.png"), 1, ":2: image file not found: "),
    ("conversation without a gpt turn", _gpt_less, 1, ":2: conversation has no gpt turn"),
    ("unknown class", _edit_line("answer", "weather"), 1, ":2: unknown class 'weather' (labels: calendar, "
                                                          "claim-window, provider-select)"),
    ("<image> count does not match", _edit_line("human", f"<image>\n<image>\n{ROUTER_USER_PROMPT}"), 1,
     ":2: the human turn has 2 <image> placeholder(s) but the line has 1 image(s)"),
    ("rank above the serving limit", ["--lora_r", "64"], 2,
     "LoRA rank lora_r=64 is above the serving limit max_lora_rank=16 (engine.max_lora_rank of "),
    ("rank above an explicit limit", ["--lora_r", "16", "--max_lora_rank", "8"], 2,
     "lora_r=16 is above the serving limit max_lora_rank=8 (--max_lora_rank)"),
    ("vision-tower target", ["--lora_target_modules", "q_proj,linear_fc1"], 2,
     "lora_target_modules ['linear_fc1'] are vision-tower modules; pass --lora_vision_tower True"),
]


@pytest.mark.parametrize("case, breakage, status, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_fail_before_training_with_a_clear_message(recipe, tmp_path, capsys, case, breakage, status,
                                                              message):
    train_data = _write_router_data(tmp_path, 1)
    extra = breakage if isinstance(breakage, list) else []
    if callable(breakage):
        breakage(train_data)
    code = _exit_code(_argv(recipe, train_data, train_data, tmp_path / "out", *extra))
    err = capsys.readouterr().err
    assert code == status
    assert message in err, err
    if callable(breakage):
        assert f"{train_data}:2: " in err  # the file and line number
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_eval_data_with_another_label_set_is_refused(recipe, tmp_path):
    train_data = _write_router_data(tmp_path, 1)
    four = _write_router_data(tmp_path, 1, labels=[*LABELS, "chandra-ocr"], name="eval4.jsonl")
    with pytest.raises(DataError, match="names labels"):
        train(*parse_args(_argv(recipe, train_data, four, tmp_path / "out")))
