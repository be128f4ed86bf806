"""The trainer CLI: the seed's flags verbatim, config precedence, precision messages, bad inputs, and a tiny run
(checkpoint pruning, resume, manifest, a servable adapter)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from training.llava_data import DataError
from training.prompts import ROUTER_USER_PROMPT, router_system_prompt
from training.train_qwen import (
    TrainConfig, TrainError, Trainer, checkpoints, cli, parse_config, resolve_precision,
)

SEED_COMMAND = """
--model_name_or_path tiny --data_path data/train.jsonl --eval_data_path data/eval.jsonl --output_dir out/router
--num_train_epochs 3 --per_device_train_batch_size 4 --per_device_eval_batch_size 8
--gradient_accumulation_steps 2 --evaluation_strategy "epoch" --save_strategy "epoch" --save_total_limit 2
--learning_rate 2e-4 --weight_decay 0.01 --warmup_ratio 0.03 --lr_scheduler_type "cosine" --logging_steps 10
--bf16 True --tf32 True --gradient_checkpointing True --dataloader_num_workers 2 --report_to "tensorboard"
"""
LABELS = ["calendar", "claim-window", "provider-select"]
# Tiny images and pixel limits: a handful of image tokens, so a run takes seconds on the random base.
TINY_PIXELS = ["--min_pixels", str(32 * 32 * 2), "--max_pixels", str(32 * 32 * 4)]


def test_the_seed_command_parses_verbatim():
    cfg = parse_config(shlex.split(SEED_COMMAND))
    assert (cfg.model_name_or_path, cfg.data_path, cfg.eval_data_path, cfg.output_dir) == (
        "tiny", "data/train.jsonl", "data/eval.jsonl", "out/router")
    assert (cfg.num_train_epochs, cfg.per_device_train_batch_size, cfg.per_device_eval_batch_size,
            cfg.gradient_accumulation_steps) == (3.0, 4, 8, 2)
    assert (cfg.evaluation_strategy, cfg.save_strategy, cfg.save_total_limit) == ("epoch", "epoch", 2)
    assert (cfg.learning_rate, cfg.weight_decay, cfg.warmup_ratio, cfg.lr_scheduler_type) == (2e-4, 0.01, 0.03, "cosine")
    assert (cfg.logging_steps, cfg.dataloader_num_workers, cfg.report_to) == (10, 2, "tensorboard")
    assert cfg.bf16 is True and cfg.tf32 is True and cfg.gradient_checkpointing is True


@pytest.mark.parametrize("argv, field, value", [
    (["--eval_strategy", "steps", "--eval_steps", "7"], "evaluation_strategy", "steps"),
    (["--bf16", "False"], "bf16", False),
    (["--bf16"], "bf16", True),
    (["--lora_target_modules", "q_proj,v_proj"], "lora_target_modules", ["q_proj", "v_proj"]),
    (["--lora_rank", "8"], "lora_r", 8),
    (["--save_total_limit", "None"], "save_total_limit", None),
])
def test_flag_forms(argv, field, value):
    cfg = parse_config(["--eval_data_path", "e.jsonl", *argv])
    assert getattr(cfg, field) == value


def test_defaults_then_yaml_then_flags(tmp_path):
    yaml_path = tmp_path / "train.yaml"
    yaml_path.write_text("learning_rate: 0.001\nlora_r: 8\neval_strategy: 'no'\nnum_train_epochs: 5\n")
    cfg = parse_config(["--config", str(yaml_path), "--lora_r", "4"])
    assert cfg.learning_rate == 0.001  # YAML over the default
    assert cfg.lora_r == 4  # flag over YAML
    assert cfg.num_train_epochs == 5 and cfg.evaluation_strategy == "no"
    assert cfg.weight_decay == TrainConfig().weight_decay  # untouched default
    assert cfg.lora_alpha == 8  # derived from the final rank


def test_serving_limits_come_from_the_deployment_config(tmp_path):
    deployment = tmp_path / "deploy.yaml"
    deployment.write_text("engine:\n  max_lora_rank: 8\n  min_pixels: 4096\n  max_pixels: 65536\n")
    cfg = parse_config(["--serving_config", str(deployment), "--lora_r", "8"])
    assert (cfg.max_lora_rank, cfg.min_pixels, cfg.max_pixels) == (8, 4096, 65536)
    assert parse_config(["--serving_config", str(deployment), "--lora_r", "8", "--max_pixels", "32768"]).max_pixels == 32768
    assert TrainConfig().max_lora_rank == 16  # configs/tiny-cpu.yaml's engine.max_lora_rank


@pytest.mark.parametrize("case, kwargs, message", [
    ("rank above the serving limit", {"lora_r": 64}, "lora_r=64 is above the serving limit max_lora_rank=16"),
    ("vision-tower target", {"lora_target_modules": ["q_proj", "qkv"]}, "vision-tower modules"),
    ("unknown strategy", {"save_strategy": "sometimes"}, "save_strategy must be one of"),
    ("unknown reporter", {"report_to": "wandb"}, "report_to 'wandb' is not supported"),
    ("unknown scheduler", {"lr_scheduler_type": "exotic"}, "lr_scheduler_type must be one of"),
    ("not a vLLM rank limit", {"max_lora_rank": 24}, "max_lora_rank must be one of vLLM's ranks"),
    ("pixel limits reversed", {"min_pixels": 9000, "max_pixels": 4000}, "min_pixels 9000 exceeds max_pixels"),
    ("no epochs", {"num_train_epochs": 0}, "num_train_epochs must be > 0"),
])
def test_bad_settings_are_refused(case, kwargs, message):
    with pytest.raises(TrainError, match=message):
        TrainConfig(**kwargs)


def test_yaml_with_an_unknown_key_names_it(tmp_path):
    yaml_path = tmp_path / "train.yaml"
    yaml_path.write_text("learnin_rate: 0.1\n")
    with pytest.raises(TrainError, match=r"train.yaml: unknown setting 'learnin_rate'"):
        parse_config(["--config", str(yaml_path)])


def test_precision_flags_on_a_cpu_are_reported_and_ignored():
    cfg = TrainConfig(bf16=True, tf32=True)
    use_bf16, notes = resolve_precision(cfg, cuda=False, bf16_supported=False)
    assert use_bf16 is False
    assert any(n.startswith("--tf32 True ignored: TF32 is a CUDA matmul mode") for n in notes)
    assert any(n.startswith("--bf16 True ignored: bf16 mixed precision is used on CUDA GPUs only") for n in notes)
    assert resolve_precision(cfg, cuda=True, bf16_supported=True) == (True, [])
    with pytest.raises(TrainError, match="this GPU does not support bfloat16"):
        resolve_precision(cfg, cuda=True, bf16_supported=False)


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


def _argv(train: Path, evaluation: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", "tiny-random", "--data_path", str(train), "--eval_data_path", str(evaluation),
            "--output_dir", str(out), "--num_train_epochs", "3", "--per_device_train_batch_size", "4",
            "--learning_rate", "5e-3", "--lora_r", "4", "--lora_dropout", "0.1", "--logging_steps", "1",
            "--save_strategy", "epoch", "--disable_tqdm", "True", "--max_new_tokens", "4", *TINY_PIXELS, *extra]


def _adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def straight_run(tiny_data, tmp_path_factory):
    """3 epochs without interruption, the seed's precision flags given, TensorBoard on, 2 checkpoints kept."""
    out = tmp_path_factory.mktemp("straight") / "router"
    logged: list[str] = []
    cfg = parse_config(_argv(*tiny_data, out, "--save_total_limit", "2", "--bf16", "True", "--tf32", "True",
                             "--report_to", "tensorboard"))
    metrics = Trainer(cfg, log=logged.append).train()
    return out, metrics, logged


def test_a_tiny_run_writes_a_servable_adapter_with_its_manifest(straight_run, tiny_data):
    from serving.adapters import check_adapters
    from serving.config import from_dict
    from training.manifest import AdapterManifest, file_sha256
    from training.tiny_model import resolve_base_model

    out, metrics, logged = straight_run
    manifest = AdapterManifest.read(out)
    assert manifest.labels == LABELS and manifest.rank == 4
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
                            "engine": {"max_lora_rank": 8}})
    check_adapters(deployment, manifest.base_model)
    # Metrics: a loss curve with first and last values, one evaluation per epoch.
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["loss_first"] == saved["loss_curve"][0][1] and saved["loss_last"] == saved["loss_curve"][-1][1]
    assert [e["epoch"] for e in saved["evaluations"]] == [1, 2, 3]
    assert metrics["global_step"] == 9
    # Precision flags that cannot apply on a CPU were reported, not fatal.
    assert any("--tf32 True ignored" in line for line in logged)
    assert any("--bf16 True ignored" in line for line in logged)
    assert list((out / "runs").iterdir()), "TensorBoard event files"


def test_checkpoints_are_pruned_to_the_limit(straight_run):
    out, _, _ = straight_run
    assert [p.name for p in checkpoints(out)] == ["checkpoint-6", "checkpoint-9"]


class _Stop(Exception):
    pass


def test_resume_from_the_last_checkpoint_gives_the_same_adapter(straight_run, tiny_data, tmp_path):
    import torch

    out = tmp_path / "router"

    def stop_in_epoch_two(trainer):
        if trainer.state.global_step == 5:  # after the epoch-1 checkpoint (step 3), mid epoch 2
            raise _Stop

    with pytest.raises(_Stop):
        Trainer(parse_config(_argv(*tiny_data, out)), on_step=stop_in_epoch_two, log=lambda *_: None).train()
    assert [p.name for p in checkpoints(out)] == ["checkpoint-3"]
    with pytest.raises(TrainError, match="already holds checkpoints"):
        Trainer(parse_config(_argv(*tiny_data, out)), log=lambda *_: None).train()
    metrics = Trainer(parse_config(_argv(*tiny_data, out, "--resume_from_checkpoint", "last")),
                      log=lambda *_: None).train()
    assert metrics["global_step"] == 9
    resumed, straight = _adapter_weights(out), _adapter_weights(straight_run[0])
    assert resumed.keys() == straight.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-4, atol=1e-6)
    # The resumed run's loss curve continues the interrupted one's (steps 1..9, no gap, no repeat).
    assert [s for s, _ in metrics["loss_curve"]] == list(range(1, 10))


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
    # (case, how the input is broken: an edit of line 2 of the training file, or extra flags; expected message)
    ("missing image", _edit_line("image", "images/nowhere.png"), ":2: image file not found: "),
    ("conversation without a gpt turn", _gpt_less, ":2: conversation has no gpt turn"),
    ("unknown class", _edit_line("answer", "weather"), ":2: unknown class 'weather' (labels: calendar, "
                                                       "claim-window, provider-select)"),
    ("<image> count does not match", _edit_line("human", f"<image>\n<image>\n{ROUTER_USER_PROMPT}"),
     ":2: the human turn has 2 <image> placeholder(s) but the line has 1 image(s)"),
    ("rank above the serving limit", ["--lora_r", "64"],
     "LoRA rank lora_r=64 is above the serving limit max_lora_rank=16 (engine.max_lora_rank of "),
    ("rank above an explicit limit", ["--lora_r", "16", "--max_lora_rank", "8"],
     "lora_r=16 is above the serving limit max_lora_rank=8 (--max_lora_rank)"),
]


@pytest.mark.parametrize("case, breakage, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_fail_before_training_with_a_clear_message(tmp_path, capsys, case, breakage, message):
    train = _write_router_data(tmp_path, 1)
    extra = breakage if isinstance(breakage, list) else []
    if callable(breakage):
        breakage(train)
    code = cli(_argv(train, train, tmp_path / "out", *extra))
    err = capsys.readouterr().err
    assert code != 0
    assert message in err, err
    if callable(breakage):
        assert f"{train}:2: " in err  # the file and line number
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_eval_data_with_another_label_set_is_refused(tmp_path):
    train = _write_router_data(tmp_path, 1)
    four = _write_router_data(tmp_path, 1, labels=[*LABELS, "chandra-ocr"], name="eval4.jsonl")
    with pytest.raises(DataError, match="names labels"):
        Trainer(parse_config(_argv(train, four, tmp_path / "out"))).train()
