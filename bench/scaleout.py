"""Scale-out: the trainer's loop on 2 processes against 1, DDP and FSDP, at the same global batch.

    .venv/bin/python bench/scaleout.py --model tiny --steps 8
    .venv/bin/python bench/scaleout.py --gpu-llama3-8b --steps 5   # CUDA: every GPU of the machine

Each run drives `TrainingLoop._step` (the trainer's own step: micro-batches, gradient sync, clipping,
AdamW) in fresh processes: one plain process, then `torchrun --nproc_per_node=N` for each strategy,
with `gradientAccumulationSteps` set so every optimizer step holds the same micro-batches whatever
the process count. Under torchrun each process then times the same steps again with a loop that
is not wrapped and makes no collective call, while the other processes do the same: the time the
step loses to communication is `communication_share = 1 - compute-only / measured`. The parent
prints one JSON object; bench/README.md says what each figure means and how it extrapolates.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_throughput beside it, also under `python -I`
import train_throughput as tt

from tuneloom.api import FineTuneJobSpec
from tuneloom.trainer import distributed
from tuneloom.trainer.distributed import Ranks

SCRIPT = Path(__file__).resolve()
STRATEGIES = ("ddp", "fsdp")


def job_spec(args: argparse.Namespace, strategy: str, accumulation: int) -> FineTuneJobSpec:
    """train_throughput.py's job, with the strategy and the accumulation that keeps the global batch."""
    document = tt.job_document(args.model_dir, args)
    document["hyperparameters"]["gradientAccumulationSteps"] = accumulation
    document["distributed"] = {"strategy": strategy}
    return FineTuneJobSpec.model_validate(document)


# --- one process of a run --------------------------------------------------------------------


def timed_steps(loop: Any, plan: Any, rank: int, args: argparse.Namespace, ranks: Ranks) -> dict[str, Any]:
    """One warm-up step, then `args.steps` timed ones, this rank's share of each."""
    reporter = tt.LossRecorder(total_steps=plan.total_steps, steps_per_epoch=plan.steps_per_epoch)
    loop.model.train()
    torch.manual_seed(args.seed)
    steps = itertools.chain.from_iterable(plan.steps_of_epoch(args.seed, epoch, rank) for epoch in itertools.count())
    tt.reset_peak(loop.device)
    for _ in range(tt.WARMUP_STEPS):
        loop._step(next(steps), reporter)
    distributed.barrier(ranks)
    watch = tt.Stopwatch(loop.device)
    watch.start()
    for _ in range(args.steps):
        loop._step(next(steps), reporter)
    watch.stop()
    tokens = sum(reporter.tokens[tt.WARMUP_STEPS :])  # over every rank of `ranks`
    return {
        "seconds_per_step": round(watch.wall / args.steps, 4),
        "cpu_seconds_per_step": round(watch.cpu / args.steps, 4),
        "tokens_per_s": round(tokens / watch.wall, 1),
        "loss_last_step": round(reporter.losses[-1], 4),
        **tt.peak_memory(loop.device),
    }


def worker(args: argparse.Namespace) -> int:
    from tuneloom.trainer.batching import pack_rows
    from tuneloom.trainer.loop import Plan, TrainingLoop
    from tuneloom.trainer.modeling import load_model

    ranks = distributed.setup()
    device = distributed.device_for(ranks)
    examples = tt.load_examples(args.data)
    spec = job_spec(args, args.worker, args.global_micro_batches // ranks.world_size)
    rows = pack_rows(examples, args.max_seq_length)
    lengths = [sum(len(examples[i].input_ids) for i in row) for row in rows]
    hp = spec.hyperparameters
    one_epoch = Plan(rows, lengths, hp.batchSize, hp.gradientAccumulationSteps, 1, ranks.world_size)
    epochs = math.ceil((args.steps + tt.WARMUP_STEPS) / one_epoch.steps_per_epoch)
    plan = Plan(rows, lengths, hp.batchSize, hp.gradientAccumulationSteps, epochs, ranks.world_size)

    def loop_over(model: Any, loop_ranks: Ranks) -> Any:
        return TrainingLoop(spec, model, examples, [], plan, device, None, lambda _start: None, loop_ranks)

    result: dict[str, Any] = {"processes": ranks.world_size, "strategy": args.worker}
    try:
        model = load_model(spec, args.model_dir, device)
        result["parameters"] = sum(p.numel() for p in model.parameters())
        result["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        loop = loop_over(model, ranks)
        result |= timed_steps(loop, plan, ranks.rank, args, ranks)
        result["peak_memory_bytes_per_process"] = distributed.gathered(result.pop("peak_memory_bytes"), ranks)
        if ranks.enabled:
            del loop, model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            # The same steps, unwrapped and with no collective, every process at once (same core
            # contention): what the step costs without its communication.
            unwrapped = loop_over(load_model(spec, args.model_dir, device), Ranks())
            alone = timed_steps(unwrapped, plan, ranks.rank, args, ranks)
            computing = max(distributed.gathered(alone["seconds_per_step"], ranks))
            result["compute_only_seconds_per_step"] = computing
            result["communication_share"] = round(max(0.0, 1 - computing / result["seconds_per_step"]), 3)
    except torch.OutOfMemoryError as error:
        result |= {"fits": False, "error": str(error).splitlines()[0]}
    if ranks.is_main:
        print(tt.RESULT_PREFIX + json.dumps(result), flush=True)
    distributed.teardown(ranks)
    return 0


# --- the parent ------------------------------------------------------------------------------


def run(args: argparse.Namespace, strategy: str, processes: int) -> dict[str, Any]:
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [
        *launcher,
        str(SCRIPT),
        f"--worker={strategy}",
        f"--model-dir={args.model_dir}",
        f"--data={args.data}",
        f"--method={args.method}",
        f"--global-micro-batches={args.global_micro_batches}",
        f"--steps={args.steps}",
        f"--batch-size={args.batch_size}",
        f"--max-seq-length={args.max_seq_length}",
        f"--learning-rate={args.learning_rate}",
        f"--seed={args.seed}",
        *(["--gradient-checkpointing"] if args.gradient_checkpointing else []),
        *([f"--micro-batch-tokens={args.micro_batch_tokens}"] if args.micro_batch_tokens is not None else []),
    ]
    print(f"[bench] {strategy} on {processes} process(es) ...", file=sys.stderr, flush=True)
    # One thread a process on CPU: the processes share the cores instead of fighting over them.
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads_per_process)}
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(tt.RESULT_PREFIX)]
    if done.returncode or not lines:
        tail = "\n".join(done.stdout.splitlines()[-20:])
        raise SystemExit(f"{strategy} on {processes} process(es) failed (exit {done.returncode}):\n{tail}")
    return json.loads(lines[-1][len(tt.RESULT_PREFIX) :])


def bytes_per_step(strategy: str, parameters: int, trainable: int, processes: int, on_gpu: bool) -> int:
    """What each process sends per optimizer step (ring collectives, N processes): DDP all-reduces
    fp32 gradients, 2 (N-1)/N of them; FSDP all-gathers the parameters (bf16 on GPU, fp32 on CPU)
    for the forward and again for the backward, (N-1)/N each time, and reduce-scatters the fp32
    gradients, (N-1)/N."""
    share = (processes - 1) / processes
    if strategy == "ddp":
        return round(2 * share * trainable * 4)
    return round(2 * share * parameters * (2 if on_gpu else 4) + share * trainable * 4)


def compare(args: argparse.Namespace, processes: int) -> dict[str, Any]:
    single = run(args, "ddp", 1)  # one process: neither strategy wraps the model
    report: dict[str, Any] = {"1_process": single}
    for strategy in args.strategies:
        several = run(args, strategy, processes)
        entry: dict[str, Any] = {f"{processes}_processes": several}
        if "tokens_per_s" in several:
            entry["throughput_ratio"] = round(several["tokens_per_s"] / single["tokens_per_s"], 3)
            entry["scaling_efficiency"] = round(entry["throughput_ratio"] / processes, 3)
            entry["bytes_sent_per_process_per_step"] = bytes_per_step(
                strategy, several["parameters"], several["trainable_parameters"], processes, torch.cuda.is_available()
            )
        report[strategy] = entry
    return report


def parent(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="tuneloom-scaleout-") as tmp:
        workdir = Path(tmp)
        if args.gpu_llama3_8b:
            if not torch.cuda.is_available():
                raise SystemExit("--gpu-llama3-8b needs CUDA GPUs; none was found")
            args.model_dir = tt.build_random_llama(workdir / "llama3-8b", tt.LLAMA3_8B_SHAPE, "cuda")
            vocab = tt.LLAMA3_8B_SHAPE["vocab_size"]
            processes = torch.cuda.device_count()
        else:
            args.model_dir = tt.resolve_model(args.model, workdir)
            vocab = json.loads((args.model_dir / "config.json").read_text())["vocab_size"]
            processes = args.processes
        if args.global_micro_batches % processes:
            raise SystemExit(f"--global-micro-batches {args.global_micro_batches} must be a multiple of {processes}")
        examples = tt.token_examples(args.examples, args.max_seq_length, vocab, args.seed)
        args.data = workdir / "examples.json"
        tt.save_examples(examples, args.data)
        report = {
            "device": tt.describe_device(torch.device("cuda" if args.gpu_llama3_8b else "cpu")),
            "model": tt.model_shape(args.model_dir),
            "method": args.method,
            "global_batch": {
                "micro_batches": args.global_micro_batches,
                "rows_per_micro_batch": args.batch_size,
                "max_seq_length": args.max_seq_length,
            },
            "steps_timed": args.steps,
            "threads_per_process": args.threads_per_process,
            "data": tt.data_summary(examples, args.max_seq_length),
            "versions": tt.versions(),
            **compare(args, processes),
        }
    tt.print_report(report, args.json_out)
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny (derived from smollm2), smollm2 or a model directory")
    parser.add_argument("--gpu-llama3-8b", action="store_true", help="a random Llama-3-8B-shaped model on every GPU")
    parser.add_argument("--method", choices=("full", "lora"), default="full")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--processes", type=int, default=2, help="CPU: processes against 1 (GPU: every GPU)")
    parser.add_argument("--threads-per-process", type=int, default=1, help="OMP_NUM_THREADS of each process")
    parser.add_argument("--global-micro-batches", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps, after 1 warm-up step")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per micro-batch")
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--micro-batch-tokens", type=int, help="hyperparameters.microBatchTokens (default: the trainer's)"
    )
    parser.add_argument("--json-out", help="also write the JSON report to this file")
    # Set by the parent for the processes of one run.
    parser.add_argument("--worker", choices=STRATEGIES, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.steps, args.batch_size, args.processes, args.global_micro_batches, args.examples) < 1:
        parser.error("--steps, --batch-size, --processes, --global-micro-batches and --examples must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return worker(args) if args.worker else parent(args)


if __name__ == "__main__":
    sys.exit(main())
