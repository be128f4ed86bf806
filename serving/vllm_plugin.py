"""A vLLM general plugin (entry point `vllm.general_plugins`, loaded in every vLLM process of this environment):
base-model tokens must get no LoRA on the CPU platform.

vLLM's PyTorch LoRA ops, which its CPU platform runs, gather each token's adapter as `weights[index]`, and a
base-model token's index is -1: it got the last LoRA slot's adapter. A base request batched beside adapter requests
answered as that adapter (the admin API's probe then refused good adapters as no-ops), and vLLM's unload leaves an
adapter in its slot, so no slot can be kept empty. The wrapped ops leave -1 rows as they were, as vLLM's GPU kernels
do (upstream: vllm-project/vllm#48421); `register` wraps them only while vLLM's own ops still show the fault.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def skip_no_lora_rows(op: Callable) -> Callable:
    """`op(inputs, weights, output, indices, ...)` that leaves the output rows of index -1 unchanged."""
    @functools.wraps(op)
    def wrapped(inputs: torch.Tensor, weights: torch.Tensor, output: torch.Tensor, indices: torch.Tensor,
                *args, **kwargs):
        no_lora = indices < 0
        if indices.shape[0] != output.shape[0] or not bool(no_lora.any()):
            return op(inputs, weights, output, indices, *args, **kwargs)
        kept = output[no_lora].clone()
        op(inputs, weights, output, indices.clamp(min=0), *args, **kwargs)
        output[no_lora] = kept

    wrapped.skips_no_lora_rows = True
    return wrapped


def gives_base_tokens_a_lora(shrink: Callable) -> bool:
    """Whether `shrink` (vLLM's bgmv_shrink) writes a non-zero LoRA product into a row whose index is -1."""
    inputs = torch.ones(2, 4)
    weights = torch.ones(2, 1, 3, 4)  # two slots, rank 3, hidden 4
    output = torch.zeros(2, 3)
    shrink(inputs, weights, output, torch.tensor([0, -1]), 1.0)
    return bool(output[1].any())


def register() -> None:
    """Wrap vLLM's PyTorch LoRA ops where they still give base-model tokens the last slot's adapter."""
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    if getattr(lora_ops.bgmv_shrink, "skips_no_lora_rows", False) or not gives_base_tokens_a_lora(lora_ops.bgmv_shrink):
        return
    # sgmv_* call the bgmv_* of lora_ops; the CPU punica wrapper imported its own references.
    for name in _OPS:
        wrapped = skip_no_lora_rows(getattr(lora_ops, name))
        setattr(lora_ops, name, wrapped)
        if hasattr(punica_cpu, name):
            setattr(punica_cpu, name, wrapped)
    log.debug("vLLM's PyTorch LoRA ops wrapped: base-model tokens get no LoRA")
