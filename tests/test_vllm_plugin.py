"""The vLLM plugin that keeps base-model tokens free of LoRA on CPU, on vLLM's own PyTorch LoRA ops."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch
from vllm.lora.ops.torch_ops import lora_ops

from serving.vllm_plugin import gives_base_tokens_a_lora, register, skip_no_lora_rows

# vLLM's ops as shipped, whatever the plugin did to the module since.
ORIGINAL = {name: getattr(getattr(lora_ops, name), "__wrapped__", getattr(lora_ops, name))
            for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")}


def _case(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens, slots, rank, hidden = 6, 3, 4, 8
    return (torch.randn(tokens, hidden, generator=gen), torch.randn(slots, 1, rank, hidden, generator=gen),
            torch.randn(slots, 1, hidden, rank, generator=gen), torch.tensor([0, -1, 2, -1, 1, 2]))


@pytest.mark.parametrize("op", ["bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"])
def test_rows_of_base_tokens_are_left_as_they_were_and_the_rest_as_vllm_computes_them(op):
    x, a, b, indices = _case()
    inputs, weights = (x, a) if op == "bgmv_shrink" else (torch.randn(6, 4), b)
    extra = {"bgmv_shrink": (0.5,), "bgmv_expand": (True,), "bgmv_expand_slice": (0, 8, True)}[op]
    start = torch.randn(6, 4 if op == "bgmv_shrink" else 8)
    ours, theirs = start.clone(), start.clone()
    skip_no_lora_rows(ORIGINAL[op])(inputs, weights, ours, indices, *extra)
    ORIGINAL[op](inputs, weights, theirs, indices.clamp(min=0), *extra)
    base = indices < 0
    assert torch.equal(ours[base], start[base])
    assert torch.equal(ours[~base], theirs[~base])


def test_vllms_ops_still_show_the_fault_and_the_plugin_removes_it():
    assert gives_base_tokens_a_lora(ORIGINAL["bgmv_shrink"])  # when this fails, vLLM fixed it: drop the plugin
    register()
    assert not gives_base_tokens_a_lora(lora_ops.bgmv_shrink)
    register()  # vLLM loads plugins once per process, but twice must not wrap twice
    assert lora_ops.bgmv_shrink.__wrapped__ is ORIGINAL["bgmv_shrink"]


def test_the_plugin_is_installed_where_vllm_looks_for_it():
    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins.get("lora-router-cpu-lora") == "serving.vllm_plugin:register"
