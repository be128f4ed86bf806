"""The LoRA trainer on transformers.Trainer: args (settings), callbacks (eval accuracy, log lines), run (a run)."""
