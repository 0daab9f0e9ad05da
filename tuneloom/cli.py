"""The `tuneloom` command. Each subcommand imports its component only when it runs, so
`tuneloom validate-data` works without torch installed."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any

# The entry-point group through which other distributions add subcommands (tuneloom-dev adds `dev`).
COMMANDS_GROUP = "tuneloom.cli_commands"
DEV_TOOLS_HINT = "From a checkout, install them with `pip install -e ./dev` (or `make env-dev`)."


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _train(args: argparse.Namespace) -> int:
    from tuneloom.trainer.main import run_from_file

    return run_from_file(args.file, metrics_port=args.metrics_port, fresh=args.fresh)


def _validate_data(args: argparse.Namespace) -> int:
    from tuneloom.trainer.datafile import TargetDevice, validate_data_command

    return validate_data_command(
        args.file,
        fmt=args.format,
        model=args.model,
        max_seq_length=args.max_seq_length,
        batch_size=args.batch_size,
        epochs=args.epochs,
        max_line_bytes=args.max_line_bytes,
        validation=args.validation,
        validation_split=args.validation_split,
        strict=args.strict,
        target=TargetDevice(args.device, args.gpus, args.method, args.gpu_hour_price),
    )


def _report(args: argparse.Namespace) -> int:
    from tuneloom.trainer.reportcommand import report_command

    return report_command(args.uri, args.output)


def _models_prepare(args: argparse.Namespace) -> int:
    from tuneloom.models import prepare_model

    path = prepare_model(args.name)
    print(path)
    return 0


def _api(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tuneloom.openai_api.main import new_key, serve
    from tuneloom.openai_api.settings import ApiSettings

    if args.api_command == "new-key":
        return new_key(args.project, Path(args.keys_file))
    if not args.store:
        print("error: tuneloom api: --store is required", file=sys.stderr)
        return 2
    settings = {
        "store": args.store,
        "host": args.host,
        "port": args.port,
        "api_key_env": args.api_key_env,
        "keys_file": args.keys_file,
        "state_dir": args.state_dir,
        "max_running": args.max_running,
        "max_seq_length": args.max_seq_length,
        "serve_max_model_len": args.serve_max_model_len,
        "kubernetes": args.kubernetes,
        "keys_secret": args.keys_secret,
        "job_s3_endpoint": args.job_s3_endpoint,
        "job_storage_secret": args.job_storage_secret,
        "modelserver_key_env": args.modelserver_key_env,
    }
    return serve(ApiSettings(**{k: v for k, v in settings.items() if v is not None}))


def _operator(args: argparse.Namespace) -> int:
    from tuneloom.operator.main import run

    return run(verbose=args.verbose)


def _serve(args: argparse.Namespace) -> int:
    from tuneloom.serving.server import ServeOptions, serve

    vllm_args = list(args.vllm_args)
    if vllm_args[:1] == ["--"]:
        vllm_args = vllm_args[1:]
    return serve(
        ServeOptions(
            base_model=args.base_model,
            store=args.store,
            namespace=args.namespace,
            allowed_namespaces=tuple(n for n in args.allowed_namespaces.split(",") if n),
            served_model_name=args.served_model_name,
            host=args.host,
            port=args.port,
            max_loras=args.max_loras,
            max_lora_rank=args.max_lora_rank,
            max_cpu_loras=args.max_cpu_loras,
            max_model_len=args.max_model_len,
            api_key_env=args.api_key_env,
            allow_unpromoted=args.allow_unpromoted,
            vllm_args=tuple(vllm_args),
        )
    )


def build_parser() -> argparse.ArgumentParser:
    from tuneloom.api import DEFAULT_MAX_LORA_RANK, DEFAULT_MAX_LORAS, DEFAULT_VALIDATION_SPLIT
    from tuneloom.trainer.datafile import DEFAULT_MAX_LINE_BYTES, FORMATS  # standard library only: cheap
    from tuneloom.trainer.estimate import DEVICES, FLOPS_PER_TOKEN_PER_PARAMETER

    parser = argparse.ArgumentParser(prog="tuneloom", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="fine-tune a model as a FineTuneJob YAML describes")
    train.add_argument("-f", "--file", required=True, help="FineTuneJob YAML")
    train.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    train.add_argument("--fresh", action="store_true", help="ignore existing checkpoints of this job")
    train.set_defaults(handler=_train)

    validate = commands.add_parser("validate-data", help="check a JSONL dataset before training")
    validate.add_argument("file", help="JSONL file")
    validate.add_argument("--format", choices=list(FORMATS), default="chat")
    validate.add_argument("--model", help="model directory whose tokenizer counts the tokens")
    validate.add_argument("--validation", help="held-out JSONL file, checked too and compared for leakage")
    validate.add_argument(
        "--validation-split",
        type=float,
        default=DEFAULT_VALIDATION_SPLIT,
        help="share held out when there is no --validation file (a FineTuneJob's dataset.validationSplit)",
    )
    validate.add_argument("--strict", action="store_true", help="data-quality warnings are errors")
    validate.add_argument("--max-seq-length", type=int, default=1024)
    validate.add_argument("--batch-size", type=int, default=8, help="for the estimated step count")
    validate.add_argument("--epochs", type=int, default=3, help="for the estimated step count")
    validate.add_argument(
        "--max-line-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_LINE_BYTES,
        help="longest line (one example) accepted, in bytes; a FineTuneJob's dataset.maxLineBytes",
    )
    validate.add_argument(
        "--device", choices=sorted(DEVICES), default="cpu", help="where to estimate the training time (with --model)"
    )
    validate.add_argument("--gpus", type=_positive_int, default=1, help="GPUs of --device, for the estimate")
    validate.add_argument(
        "--method", choices=list(FLOPS_PER_TOKEN_PER_PARAMETER), default="lora", help="for the estimate"
    )
    validate.add_argument(
        "--gpu-hour-price", type=_non_negative_float, help="price of one GPU-hour, for the estimated cost"
    )
    validate.set_defaults(handler=_validate_data)

    report = commands.add_parser(
        "report",
        help="write report.html of a stored adapter version and print its path",
        description="Draws the version's report (loss curves, base vs adapter, promotion, data, held-out answers) "
        "from its manifest, evaluation.json and loss history; versions published before report.html existed too.",
    )
    report.add_argument(
        "uri",
        help="the version's URI as `tuneloom train` prints it: STORE/adapters/NAMESPACE/NAME/VERSION "
        "(without /VERSION: the latest); STORE is a directory, file:// or s3://",
    )
    report.add_argument("--output", help="HTML file to write (default: report-NAMESPACE-NAME-VERSION.html here)")
    report.set_defaults(handler=_report)

    models = commands.add_parser("models", help="base model assets").add_subparsers(
        dest="models_command", required=True, metavar="ACTION"
    )
    prepare = models.add_parser("prepare", help="build a known base model into the local cache")
    prepare.add_argument("name", choices=["smollm2-135m-instruct"])
    prepare.set_defaults(handler=_models_prepare)

    serve = commands.add_parser(
        "serve",
        help="serve a base model and every adapter in the store over vLLM's OpenAI API",
        description="Starts vLLM for one base model. Clients send model=NAME (latest version) or NAME@VERSION; "
        "adapters are fetched from the store on first use. Arguments after -- go to vLLM.",
    )
    serve.add_argument("--base-model", required=True, help="model directory, s3:// prefix or known model name")
    serve.add_argument("--store", required=True, help="object store root holding adapters/ (directory or s3://)")
    serve.add_argument("--namespace", default="default", help="namespace whose adapters a bare NAME means")
    serve.add_argument("--allowed-namespaces", default="", help="other namespaces clients may name (comma-separated)")
    serve.add_argument(
        "--allow-unpromoted",
        action="store_true",
        help="serve versions that failed their promotion gate when pinned as NAME@VERSION (for inspection); "
        "a bare NAME always means the latest promoted version",
    )
    serve.add_argument(
        "--served-model-name", help="the base model's name in the API (default: a hub id as given, else its folder)"
    )
    serve.add_argument("--host", default=os.environ.get("TUNELOOM_BIND_ADDRESS", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-loras", type=int, default=DEFAULT_MAX_LORAS, help="adapters in one batch")
    serve.add_argument("--max-lora-rank", type=int, default=DEFAULT_MAX_LORA_RANK)
    serve.add_argument(
        "--max-cpu-loras", type=int, help="adapters kept in CPU memory (LRU; default: --max-loras, as vLLM does)"
    )
    serve.add_argument("--max-model-len", type=int)
    serve.add_argument("--api-key-env", help="environment variable holding the API key (the key never goes on argv)")
    serve.add_argument("vllm_args", nargs=argparse.REMAINDER, help="-- then extra vLLM arguments")
    serve.set_defaults(handler=_serve)

    api = commands.add_parser(
        "api",
        help="OpenAI-compatible fine-tuning API on this machine (files, jobs, models, inference)",
        description="Serves OpenAI's fine-tuning and inference routes: an OpenAI client needs only base_url changed.",
    )
    api.add_argument("--store", help="object store root for files, checkpoints and adapters (directory or s3://)")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8080)
    api.add_argument("--api-key-env", help="environment variable holding the key of project `default`")
    api.add_argument("--keys-file", help="JSON {project: [sha256 of a key, ...]} (see `tuneloom api new-key`)")
    api.add_argument("--state-dir", help="SQLite state and job folders (default: beside a local store, else cache)")
    api.add_argument("--max-running", type=_positive_int, help="jobs training at once (default 1)")
    api.add_argument("--max-seq-length", type=_positive_int, help="tokens per training example (default 1024)")
    api.add_argument("--serve-max-model-len", type=_positive_int, help="vLLM's --max-model-len for inference")
    api.add_argument(
        "--kubernetes",
        action="store_true",
        default=None,
        help="jobs as FineTuneJobs in the namespace each key maps to (in-cluster config, else KUBECONFIG)",
    )
    api.add_argument("--keys-secret", help="with --kubernetes: NAMESPACE/NAME of the Secret holding keys.json")
    api.add_argument("--job-s3-endpoint", help="with --kubernetes: the S3 endpoint training pods use")
    api.add_argument("--job-storage-secret", help="with --kubernetes: Secret with the store's keys in each namespace")
    api.add_argument(
        "--modelserver-key-env",
        help="with --kubernetes: variable holding the key sent to ModelServers that set spec.apiKeySecret",
    )
    api.set_defaults(handler=_api, api_command=None)
    api_commands = api.add_subparsers(dest="api_command", metavar="ACTION")
    key = api_commands.add_parser("new-key", help="print a new key for a project; the keys file keeps its hash")
    key.add_argument("--project", required=True, help="project (a DNS label); its files, jobs and models")
    key.add_argument("--keys-file", required=True, help="JSON keys file to add the key's SHA-256 to")

    operator = commands.add_parser("operator", help="run the Kubernetes operator (kopf) for the whole cluster")
    operator.set_defaults(handler=_operator)

    _add_contributed_commands(commands)
    return parser


def _add_contributed_commands(commands: argparse._SubParsersAction[Any]) -> None:
    """Subcommands other installed distributions contribute, as vLLM loads its plugins: each entry
    point of the group is a function `add_commands(subparsers)`. One that fails to load costs its
    own commands, not the CLI."""
    for entry in entry_points(group=COMMANDS_GROUP):
        try:
            entry.load()(commands)
        except Exception as err:  # a broken add-on must not take `tuneloom train` down with it
            print(f"tuneloom: commands from {entry.value} not loaded: {err}", file=sys.stderr)
    if "dev" not in commands.choices:
        # `tuneloom dev` from the README without the dev tools: say how to get them. No option
        # prefix, so every word after `dev`, `--help` included, goes to that message.
        missing = commands.add_parser(
            "dev", add_help=False, prefix_chars="\0", help="development tools (not installed)"
        )
        missing.add_argument("words", nargs=argparse.REMAINDER)
        missing.set_defaults(handler=_dev_tools_missing)


def _dev_tools_missing(args: argparse.Namespace) -> int:
    print(f"tuneloom: `tuneloom dev` needs the development tools. {DEV_TOOLS_HINT}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("botocore", "urllib3", "s3transfer", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
