"""Loading the base model for a method (LoRA, QLoRA, full) and computing the masked loss."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuneloom.api import FineTuneJobSpec, Method
from tuneloom.trainer.batching import Batch
from tuneloom.trainer.tokenize import IGNORE_INDEX

log = logging.getLogger("tuneloom.trainer")


class MethodNotSupportedError(RuntimeError):
    """The job's method cannot run on this machine."""


def check_method_supported(spec: FineTuneJobSpec, device: torch.device) -> None:
    """Refuses QLoRA without CUDA before anything heavy is loaded."""
    if spec.quantized_base and device.type != "cuda":
        field, instead = (
            ("spec.dpo.qlora", "dpo.qlora: false")
            if spec.method is Method.dpo
            else ("spec.method: qlora", "method: lora")
        )
        raise MethodNotSupportedError(
            f"{field} loads the base model in 4-bit NF4 through bitsandbytes, which needs a CUDA GPU, "
            f"and none was found; use {instead} on CPU, or run on a node with an NVIDIA GPU"
        )


def weights_dtype(method: Method, device: torch.device) -> torch.dtype:
    """bf16 frozen weights on GPUs that have it; fp32 for weights the optimizer updates (full
    fine-tuning keeps fp32 master weights under bf16 autocast) and on CPUs, which mostly lack
    bf16 matrix units and run it slower than fp32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported() and method is not Method.full:
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def load_tokenizer(model_path: str | Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(spec: FineTuneJobSpec, model_path: str | Path, device: torch.device) -> nn.Module:
    """The base model as the method needs it: dtype, 4-bit quantisation for qlora, device,
    gradient checkpointing. No adapter yet."""
    from transformers import AutoModelForCausalLM

    qlora = spec.quantized_base
    kwargs: dict[str, Any] = {"dtype": weights_dtype(spec.method, device), "attn_implementation": "sdpa"}
    if qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": device.index or 0}
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if not qlora:
        model.to(device)
    model.config.use_cache = False
    checkpointing = spec.hyperparameters.gradientCheckpointing
    if qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def lora_config(spec: FineTuneJobSpec) -> Any:
    from peft import LoraConfig

    targets = spec.lora.targetModules
    return LoraConfig(
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )


# The name a starting adapter (dpo.initAdapter) is loaded under a second time, frozen: DPO's
# reference policy. The trained adapter keeps peft's default name.
REFERENCE_ADAPTER = "reference"
TRAINED_ADAPTER = "default"


def save_adapter(model: nn.Module, base_model: str, out: Path) -> None:
    """The trained LoRA adapter as a PEFT folder (adapter_config.json, adapter_model.safetensors)."""
    # Recorded as the user wrote it, not as the local cache path it was loaded from.
    model.peft_config[TRAINED_ADAPTER].base_model_name_or_path = base_model
    # Only the trained adapter: a DPO run from dpo.initAdapter also holds its frozen reference.
    model.save_pretrained(out, selected_adapters=[TRAINED_ADAPTER])


def load_model(
    spec: FineTuneJobSpec, model_path: str | Path, device: torch.device, init_adapter: Path | None = None
) -> nn.Module:
    """The trainable model: a PEFT model for lora/qlora/dpo, the base model itself for full. With
    `init_adapter` (a local adapter directory) training starts from that adapter, its own LoRA
    settings, and the same adapter is loaded again, frozen, as the reference policy."""
    from peft import PeftModel, get_peft_model

    model = load_base_model(spec, model_path, device)
    if spec.method is Method.full:
        model.train()
        return model
    if init_adapter is not None:
        started = PeftModel.from_pretrained(model, init_adapter, adapter_name=TRAINED_ADAPTER, is_trainable=True)
        started.load_adapter(init_adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        started.set_adapter(TRAINED_ADAPTER)
        log.info("LoRA from the starting adapter %s (also the reference policy)", spec.dpo.initAdapter)
        return started
    # spec.hyperparameters.seed covers the initialisation: the same job starts from the same LoRA weights.
    torch.manual_seed(spec.hyperparameters.seed)
    peft_model = get_peft_model(model, lora_config(spec))
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info(
        "LoRA r=%d on %s: %.2fM trainable of %.1fM parameters",
        spec.lora.r,
        spec.lora.targetModules,
        trainable / 1e6,
        total / 1e6,
    )
    return peft_model


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def labelled_logits(
    decoder: nn.Module, head: nn.Module, batch: Batch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The head's fp32 logits at the positions that predict a labelled token, those tokens, and the
    [rows, length - 1] mask of the positions."""
    # use_cache=False matters: with a KV cache transformers skips the packed-sequence mask and
    # packed examples would attend to each other.
    hidden = decoder(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).last_hidden_state
    targets = batch.labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return head(hidden[:, :-1][mask]).float(), targets[mask], mask


class MaskedTokenLoss(nn.Module):
    """Summed cross-entropy and correct-prediction count over labelled tokens only.

    The output head runs only on positions that have a label. With a 49k vocabulary the head is a
    large share of a small model's compute, and in chat data most tokens (system and user turns)
    carry no label, so this skips most of it and never materialises full-sequence logits.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        lm = causal_lm(model)
        self.decoder = lm.get_decoder()
        self.head = lm.get_output_embeddings()

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, wanted, mask = labelled_logits(self.decoder, self.head, batch)
        loss_sum = nn.functional.cross_entropy(logits, wanted, reduction="sum")
        correct = (logits.argmax(dim=-1) == wanted).sum()
        return loss_sum, correct, mask.sum()
