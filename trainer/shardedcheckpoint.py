"""The tensors of a sharded checkpoint (spec.distributed.strategy: fsdp), in torch.distributed.checkpoint's format.

Every rank writes its own shards (`__<rank>_0.distcp`) into a local directory and uploads them;
rank 0 adds `.metadata` (which shard holds which piece of which tensor) and the loop's state.
DCP reads the pieces each rank needs for the model as it is now, so a checkpoint from 4
processes loads on 2, or on 1 without a process group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

# Only what training changes: a LoRA run's frozen base comes from the base model again. Not strict
# on loading for the same reason; dcp.load already fails on a trainable tensor the checkpoint lacks.
_TRAINABLE = StateDictOptions(ignore_frozen_params=True, strict=False)


def write_shards(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, best: dict[str, torch.Tensor] | None
) -> None:
    """Writes this rank's shards of the trainable weights, the optimizer state and the best weights
    into `directory`; every rank calls it together."""
    tensors = _trainable_tensors(model, optimizer)
    if best is not None:
        tensors["best"] = best
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(directory))


def read_shards(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, with_best: bool
) -> dict[str, torch.Tensor] | None:
    """Loads a checkpoint `write_shards` wrote (by any number of ranks) into `model` and
    `optimizer`, resharded for this run; returns the best weights when it has them."""
    tensors = _trainable_tensors(model, optimizer)
    if with_best:
        # Shaped (and on FSDP sharded) like the parameters they will be copied into.
        tensors["best"] = {name: torch.empty_like(p) for name, p in model.named_parameters() if p.requires_grad}
    dcp.load(tensors, storage_reader=dcp.FileSystemReader(directory))
    set_state_dict(
        model, optimizer, model_state_dict=tensors["model"], optim_state_dict=tensors["optimizer"], options=_TRAINABLE
    )
    return tensors.get("best")


def _trainable_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The model's trainable weights and the optimizer state, by parameter name (FSDP's shards stay sharded)."""
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_TRAINABLE)
    # ignore_frozen_params keeps a frozen output head tied to the embedding (a LoRA run's whole vocabulary matrix).
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {"model": {k: v for k, v in model_state.items() if k in trainable}, "optimizer": optimizer_state}
