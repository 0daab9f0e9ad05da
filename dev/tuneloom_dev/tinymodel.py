"""A tiny random model derived from a prepared base model: same tokenizer, chat template and vocab,
a few small layers. Tests and benchmarks train it in seconds on CPU; the product never needs it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tuneloom.models import build_lock, build_verified, model_config_hash

# The files a causal LM's tokenizer may be saved as; the tiny model copies whichever exist so it
# tokenizes and renders chat templates exactly like its source.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)

# Bump when _build_tiny changes what it writes, so older tiny builds are rebuilt.
TINY_RECIPE = 2


def _tiny_source(source_dir: Path, **shape: float) -> dict[str, Any]:
    """What a tiny build depends on; a change to any of it means a rebuild."""
    return {"derived_from_config": model_config_hash(source_dir), "recipe": TINY_RECIPE, **shape}


def _build_tiny(source_dir: Path, out_dir: Path, shape: dict[str, Any]) -> None:
    import torch
    from transformers import AutoConfig, GenerationConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(source_dir)
    # Same vocab, special token ids, rope and norm settings as the source; only the size shrinks.
    config.num_hidden_layers = shape["num_layers"]
    config.hidden_size = shape["hidden_size"]
    config.intermediate_size = shape["intermediate_size"]
    config.num_attention_heads = shape["num_heads"]
    config.num_key_value_heads = shape["num_kv_heads"]
    config.head_dim = shape["hidden_size"] // shape["num_heads"]
    config.dtype = torch.float32
    config.initializer_range = shape["init_std"]
    # fork_rng keeps the caller's global RNG untouched while the seed makes the weights repeatable.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(shape["seed"])
        model = LlamaForCausalLM(config).to(torch.float32)
        # The embedding's padding row starts at zero, and SmolLM2 pads with its end-of-turn token:
        # with tied embeddings that token's logit would stay 0 forever, so no adapter could ever
        # learn to stop. A random row like every other token's keeps the end of turn learnable.
        if config.pad_token_id is not None:
            with torch.no_grad():
                model.get_input_embeddings().weight[config.pad_token_id].normal_(0.0, config.initializer_range)
    generation = source_dir / "generation_config.json"
    if generation.is_file():
        model.generation_config = GenerationConfig.from_pretrained(source_dir)
    model.save_pretrained(out_dir)
    for filename in TOKENIZER_FILES:
        if (source_dir / filename).is_file():
            shutil.copyfile(source_dir / filename, out_dir / filename)


def derive_tiny_model(
    source_dir: Path,
    dest: Path,
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    seed: int = 0,
    init_std: float = 0.3,
) -> Path:
    """A tiny random float32 LlamaForCausalLM with `source_dir`'s tokenizer, chat template and
    vocab, saved at `dest`: trains in seconds on CPU. Returns at once when `dest` is already a
    complete build with the same shape and source.

    Two heads of 32 dimensions: vLLM's CPU attention supports head sizes from 32 up, so the same
    model serves in tests. `init_std` is far above the usual 0.02 on purpose: at hidden size 64 that would leave the
    logits nearly flat, so an adapter could move the loss only a little and tests would hang on luck."""
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
    source_dir, dest = Path(source_dir), Path(dest)
    shape = _tiny_source(
        source_dir,
        num_layers=num_layers,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        seed=seed,
        init_std=init_std,
    )
    # Hashing ~13 MB is cheap, so the tiny model gets the same full check as a prepared one.
    with build_lock(dest):
        return build_verified(dest, shape, lambda out: _build_tiny(source_dir, out, shape), what="tiny model")
