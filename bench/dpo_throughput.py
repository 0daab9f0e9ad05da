"""DPO throughput: tuneloom's preference loop against TRL's DPOTrainer with peft, same model and data.

    .venv/bin/python bench/dpo_throughput.py --model smollm2 --pairs 200 --steps 4

Both sides train the same LoRA (train_throughput's: r=8, alpha=16, all-linear, no dropout) with the
same DPO loss (sigmoid, the same beta), batch size, learning rate and maxSeqLength, on the same
synthetic preference pairs; the reference policy is the model with the adapter disabled on both:

- tuneloom: the trainer's own pieces, as a `method: dpo` job sets them up — `encode_pair`, pairs
  packed into rows of 2 x maxSeqLength, `load_model`, and `PreferenceLoop._step` (DpoObjective)
  for each optimizer step.
- trl: `trl.DPOTrainer` with `peft_config` = the same LoRA and `ref_model=None`, given the pairs in
  TRL's conversational preference format (`prompt`/`chosen`/`rejected` messages): it applies the
  chat template itself and pads each batch's sequences to the longest.

Tokens are counted the same way on both sides: the real (non-padding) tokens of every sequence a
step scores, i.e. prompt + chosen and prompt + rejected for each pair. Each variant runs in its own
child process, exactly as train_throughput.py runs its variants, whose helpers this script uses.
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_throughput beside it, also under `python -I`
import train_throughput as tt

# Of a pair's preferred sequence (prompt + chosen, template included), as train_throughput's chat data.
CHOSEN_SHARE = tt.ASSISTANT_SHARE
# The rejected answer's length relative to the chosen one: preference sets pair answers of unequal length.
REJECTED_LENGTH_RANGE = (0.5, 1.5)
TARGETS = {"speedup_min": 1.3, "memory_ratio_max": 1.0}


# --- data ------------------------------------------------------------------------------------


def synthetic_pairs(tokenizer: Any, count: int, max_length: int, seed: int) -> list[dict[str, str]]:
    """system + user prompts with a chosen and a rejected answer, sized in tokens like chat data:
    the preferred sequence's length is train_throughput's lognormal sample."""
    rng = random.Random(seed + 1)
    overhead = tt._template_overhead(tokenizer)
    pairs = []
    for total in tt.sample_lengths(count, max_length, seed):
        chosen = max(round(total * CHOSEN_SHARE), 1)
        system = max(round(total * tt.SYSTEM_SHARE), 1)
        user = max(total - overhead - system - chosen, 1)
        rejected = max(round(chosen * rng.uniform(*REJECTED_LENGTH_RANGE)), 1)
        pairs.append(
            {
                "system": tt._text(rng, system),
                "user": tt._text(rng, user),
                "chosen": tt._text(rng, chosen),
                "rejected": tt._text(rng, rejected),
            }
        )
    return pairs


def as_examples(pairs: Sequence[dict[str, str]]) -> list[Any]:
    """The pairs as the trainer reads a preference file: the input conversation and two answers."""
    from tuneloom.trainer.datafile import Example, Message

    return [
        Example(
            line=line,
            messages=(Message("system", pair["system"]), Message("user", pair["user"])),
            preferred=pair["chosen"],
            non_preferred=pair["rejected"],
        )
        for line, pair in enumerate(pairs, start=1)
    ]


def encoded_pairs(tokenizer: Any, pairs: Sequence[dict[str, str]], max_length: int) -> list[Any]:
    """`encode_pair` of each pair, dropping those left with no answer tokens, as the trainer does."""
    from tuneloom.trainer.preference import encode_pair

    encoded = (encode_pair(tokenizer, example, max_length) for example in as_examples(pairs))
    return [pair for pair in encoded if pair.num_trained_tokens]


def trl_dataset(pairs: Sequence[dict[str, str]]) -> Any:
    """TRL's conversational preference format."""
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": [
                    {"role": "system", "content": pair["system"]},
                    {"role": "user", "content": pair["user"]},
                ],
                "chosen": [{"role": "assistant", "content": pair["chosen"]}],
                "rejected": [{"role": "assistant", "content": pair["rejected"]}],
            }
            for pair in pairs
        ]
    )


def data_summary(encoded: Sequence[Any], max_length: int) -> dict[str, Any]:
    """Token lengths of the pairs as tuneloom encodes them (each sequence is prompt + one answer)."""
    preferred = [len(pair.preferred.input_ids) for pair in encoded]
    non_preferred = [len(pair.non_preferred.input_ids) for pair in encoded]
    both = preferred + non_preferred
    return {
        "pairs": len(encoded),
        "tokens": sum(both),
        "sequence_length": {"min": min(both), "median": statistics.median(both), "max": max(both)},
        "chosen_sequence_mean": round(statistics.mean(preferred), 1),
        "rejected_sequence_mean": round(statistics.mean(non_preferred), 1),
        "sequences_truncated_to_max_seq_length": sum(length == max_length for length in both),
    }


# --- the variants ----------------------------------------------------------------------------


def run_tuneloom(args: argparse.Namespace, pairs: list[dict[str, str]], device: torch.device) -> dict[str, Any]:
    from tuneloom.trainer.dpo import PreferenceLoop
    from tuneloom.trainer.modeling import check_method_supported, load_model, load_tokenizer

    spec = tt.job_spec(args.model_dir, args)
    check_method_supported(spec, device)
    encoded = encoded_pairs(load_tokenizer(args.model_dir), pairs, args.max_seq_length)
    model = load_model(spec, args.model_dir, device)
    trainable, total = model.get_nb_trainable_parameters()
    # A pair's two sequences share a row, each up to maxSeqLength tokens (trainer/main.py `_rows`).
    row_length = 2 * args.max_seq_length
    return {
        **tt.drive_loop(PreferenceLoop, spec, model, encoded, row_length, args, device),
        "parameters": {"trainable": trainable, "total": total},
    }


def run_trl(args: argparse.Namespace, pairs: list[dict[str, str]], device: torch.device) -> dict[str, Any]:
    """TRL's DPOTrainer, configured like our side: the same LoRA on the same base model, the
    reference = the adapter disabled (`ref_model=None` with peft), beta, batch size, max_length,
    gradient checkpointing and bf16 (off on CPU) equal."""
    from trl import DPOConfig, DPOTrainer

    from tuneloom.trainer.modeling import load_base_model, load_tokenizer, lora_config

    spec = tt.job_spec(args.model_dir, args)
    with tempfile.TemporaryDirectory(prefix="tuneloom-bench-trl-dpo-") as output_dir:
        training_args = tt._training_arguments(
            DPOConfig,
            args,
            output_dir,
            device,
            beta=spec.dpo.beta,
            loss_type=[spec.dpo.loss.value],
            max_length=args.max_seq_length,
            gradient_checkpointing=args.gradient_checkpointing,
        )
        trainer, clock = tt._counting_trainer(
            DPOTrainer,
            device,
            model=load_base_model(spec, args.model_dir, device),
            ref_model=None,
            args=training_args,
            train_dataset=trl_dataset(pairs),
            processing_class=load_tokenizer(args.model_dir),
            peft_config=lora_config(spec),
        )
        return tt._measured(trainer, clock, training_args, args.steps, device)


# --- processes -------------------------------------------------------------------------------


def child_main(args: argparse.Namespace) -> int:
    from tuneloom.trainer.distributed import Ranks, device_for

    pairs = json.loads(args.data.read_text())
    device = device_for(Ranks())
    run = {"tuneloom": run_tuneloom, "trl": run_trl}[args.variant]
    result = {"variant": args.variant, **run(args, pairs, device)}
    print(tt.RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def report(
    args: argparse.Namespace,
    model_dir: Path,
    data: dict[str, Any],
    runs: dict[str, list[dict[str, Any]]],
    load_before: float,
) -> dict[str, Any]:
    from tuneloom.trainer.distributed import Ranks, device_for

    ours, theirs = tt.best_of(runs["tuneloom"]), tt.best_of(runs["trl"])
    figures = tt.comparison(ours, theirs)
    return {
        "device": tt.describe_device(device_for(Ranks())),
        # Other work on the host skews CPU timings; this says how busy it was.
        "host_load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "versions": tt.versions(),
        "model": {"name": args.model, **tt.model_shape(model_dir), "parameters": ours["parameters"]["total"]},
        **tt.run_settings(args, ours),
        "beta": tt.job_spec(model_dir, args).dpo.beta,
        "pairs": args.pairs,
        "data": data,
        "tuneloom": ours,
        "trl": theirs,
        **figures,
        "targets": TARGETS,
        "meets_targets": tt.meets(TARGETS, figures),
    }


def parent_main(args: argparse.Namespace) -> int:
    from tuneloom.trainer.modeling import load_tokenizer

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="tuneloom-bench-dpo-") as tmp:
        workdir = Path(tmp)
        model_dir = tt.resolve_model(args.model, workdir)
        tokenizer = load_tokenizer(model_dir)
        pairs = synthetic_pairs(tokenizer, args.pairs, args.max_seq_length, args.seed)
        data_file = workdir / "pairs.json"
        data_file.write_text(json.dumps(pairs))
        runs = tt.run_variants(args, model_dir, data_file, ("trl", "tuneloom"), Path(__file__).resolve())
        summary = data_summary(encoded_pairs(tokenizer, pairs, args.max_seq_length), args.max_seq_length)
        combined = report(args, model_dir, summary, runs, load_before)
    tt.print_report(combined, args.json_out)
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    tt.add_run_arguments(parser, steps=4, learning_rate=5e-5)
    parser.add_argument("--pairs", type=int, default=200, help="synthetic preference pairs (default 200)")
    # train_throughput's run_child passes --method; DPO is the only one here.
    parser.add_argument("--method", choices=("dpo",), default="dpo", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=("tuneloom", "trl"), help=argparse.SUPPRESS)
    return tt.parse_checked(parser, argv, "pairs")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return child_main(args) if args.variant else parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
