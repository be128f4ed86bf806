"""In-process greedy generation with transformers (+ PEFT): the reference the served adapter is compared to.

Prompts are rendered exactly as for training (training.llava_data: the model's chat template, the processor's
image expansion with the same pixel limits), batched with left padding.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from training.llava_data import Conversation, collate, encode, image_kwargs, load_images

DEFAULT_THREADS = int(os.environ.get("LORA_ROUTER_THREADS", "2"))


def set_threads(n: int | None = None) -> None:
    """Use n CPU threads for torch (default $LORA_ROUTER_THREADS or 2: these machines have 2 shared cores)."""
    import torch

    torch.set_num_threads(max(1, n or DEFAULT_THREADS))


def load_processor(model_dir: str | Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(model_dir))


def load_model(base: str | Path, adapter: str | Path | None = None, dtype: str = "float32"):
    """The base model in eval mode, with the PEFT adapter from `adapter` applied when given."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(str(base), dtype=getattr(torch, dtype))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    return model


def pixel_limits(processor) -> tuple[int | None, int | None]:
    """The processor's own (min_pixels, max_pixels): what vLLM uses when given no --mm-processor-kwargs."""
    size = getattr(processor.image_processor, "size", None) or {}
    return size.get("shortest_edge"), size.get("longest_edge")


def greedy_generate(model, processor, conversations: Sequence[Conversation], *, max_new_tokens: int = 8,
                    batch_size: int = 8, min_pixels: int | None = None, max_pixels: int | None = None,
                    progress: Callable[[int], None] | None = None) -> list[str]:
    """Greedy answers (decoded, special tokens dropped, stripped) to each conversation's prompt."""
    return greedy_generate_scored(model, processor, conversations, (), max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, min_pixels=min_pixels, max_pixels=max_pixels,
                                  progress=progress)[0]


def greedy_generate_scored(model, processor, conversations: Sequence[Conversation], score_ids: Sequence[int], *,
                           max_new_tokens: int = 8, batch_size: int = 8, min_pixels: int | None = None,
                           max_pixels: int | None = None,
                           progress: Callable[[int], None] | None = None) -> tuple[list[str], list[list[float]]]:
    """Greedy answers, and per conversation the full-vocabulary log-probability of each of `score_ids` at the
    first answer step (the model's raw logits: what vLLM returns for logprob_token_ids)."""
    import torch

    tok = processor.tokenizer
    pixel_kwargs = image_kwargs(min_pixels, max_pixels)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    answers: list[str] = []
    scores: list[list[float]] = []
    ids = torch.tensor(list(score_ids), dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start:start + batch_size]
            feats = [encode(processor, c.messages(), load_images(c), None, pixel_kwargs) for c in chunk]
            batch = collate(feats, tok.pad_token_id, padding_side="left")
            batch.pop("labels")
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=eos, pad_token_id=tok.pad_token_id, output_logits=len(ids) > 0,
                                     return_dict_in_generate=True)
            new = out.sequences[:, batch["input_ids"].shape[1]:]
            answers += [text.strip() for text in tok.batch_decode(new, skip_special_tokens=True)]
            if len(ids):
                scores += torch.log_softmax(out.logits[0].float(), dim=-1)[:, ids].tolist()
            if progress:
                progress(len(chunk))
    finally:
        model.train(was_training)
    return answers, scores
