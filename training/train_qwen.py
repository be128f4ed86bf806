"""Train a LoRA adapter (router or expert) on a Qwen3-VL base from LLaVA JSONL, as vLLM will serve it.

    python -m training.train_qwen \\
      --model_name_or_path tiny --data_path datasets/routing/train-classification.jsonl \\
      --eval_data_path datasets/routing/eval-classification.jsonl --output_dir checkpoints/tiny/router \\
      --num_train_epochs 3 --per_device_train_batch_size 8 --per_device_eval_batch_size 8 \\
      --gradient_accumulation_steps 1 --evaluation_strategy "epoch" --save_strategy "epoch" \\
      --save_total_limit 2 --learning_rate 2e-3 --weight_decay 0.0 --warmup_ratio 0.05 \\
      --lr_scheduler_type "cosine" --logging_steps 5 --bf16 True --tf32 True --gradient_checkpointing False \\
      --dataloader_num_workers 0 --report_to "tensorboard"

    python -m training.train_qwen --config configs/training/router-tiny.yaml \\
      --data_path D/train-classification.jsonl --eval_data_path D/eval-classification.jsonl --output_dir OUT

The flags are transformers' TrainingArguments (the seed's HF-Trainer command parses verbatim) plus the project's:
LoRA shape (--lora_r, --lora_alpha, --lora_dropout, --lora_target_modules), serving limits (--max_lora_rank,
--min_pixels, --max_pixels, --serving_config), --label_loss_weight, --max_new_tokens and --num_threads.
`--config FILE.yaml` takes the same names as keys; precedence: defaults < YAML < flags. On a CPU, --bf16 True and
--tf32 True are reported and ignored.

Output folder: the adapter (adapter_config.json, adapter_model.safetensors) with its manifest
(lora_router_manifest.json), training_args.json, metrics.json (loss curve, evaluations with the classifier's
greedy accuracy, wall time), Trainer's checkpoint-<step>/ folders (`--resume_from_checkpoint last` continues from
the newest) and, with --report_to tensorboard, TensorBoard logs under runs/. Exit status: 2 for a bad setting, 1 for
bad data.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, train, write the adapter; the exit status."""
    from lora_router.configuration import run_command
    from training.llava_data import DataError
    from training.trainer.args import parse_args
    from training.trainer.run import train

    def work() -> None:
        train(*parse_args(argv, description=__doc__))

    return run_command(work, runtime_errors=(DataError,))


if __name__ == "__main__":
    raise SystemExit(main())
