"""FSDP2 (`fully_shard`): the model sharded over the processes, for spec.distributed.strategy: fsdp.

Each transformer block is its own unit (its parameters are all-gathered just before it runs and
freed after); the loss module is the root, so the embedding, final norm and output head (tied in
most small models) form one unit that its forward gathers. Gradients are reduce-scattered, so
each process keeps and updates only its shard of the weights, gradients and AdamW state.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from tuneloom.api import DistributedStrategy, FineTuneJobSpec, Method
from tuneloom.trainer.distributed import Ranks
from tuneloom.trainer.modeling import causal_lm

log = logging.getLogger("tuneloom.trainer")


def strategy(spec: FineTuneJobSpec) -> DistributedStrategy:
    """spec.distributed.strategy, unset meaning fsdp for method full and ddp otherwise. On one
    process neither wraps the model, but fsdp still writes sharded checkpoints, so a run can resume
    on any number of processes."""
    if spec.distributed.strategy is not None:
        return spec.distributed.strategy
    return DistributedStrategy.fsdp if spec.method is Method.full else DistributedStrategy.ddp


def shards_model(spec: FineTuneJobSpec, ranks: Ranks) -> bool:
    return ranks.enabled and strategy(spec) is DistributedStrategy.fsdp


def shard(loss_module: nn.Module, model: nn.Module, spec: FineTuneJobSpec, device: torch.device) -> nn.Module:
    """Shards `model` (inside `loss_module`) in place; returns `loss_module`, now the FSDP root. The
    optimizer must be built afterwards, over the sharded parameters."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    options = {}
    if device.type == "cuda":
        # bf16 compute and all-gathers, fp32 gradient reduction and master weights.
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if spec.distributed.cpuOffload and device.type == "cuda":
        options["offload_policy"] = CPUOffloadPolicy()
    elif spec.distributed.cpuOffload:
        log.info("distributed.cpuOffload: nothing to offload, the shards are in CPU memory already")
    # transformers names the blocks a model must not be split inside: those are the units.
    blocks = set(getattr(causal_lm(model), "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, **options)
    fully_shard(loss_module, **options)
    return loss_module


@contextlib.contextmanager
def no_gradient_sync(module: nn.Module) -> Iterator[None]:
    """Accumulates gradients locally for the micro-batches before a step's last (DDP's no_sync)."""
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def whole_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded weights on CPU: on rank 0; other ranks get an empty dict. Every rank
    must call it (it all-gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
