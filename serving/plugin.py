"""The `vllm.general_plugins` entry point. vLLM calls `register` in every process it starts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuneloom.serving.adapters import AdapterSource, ServingSettings

if TYPE_CHECKING:
    from tuneloom.serving.resolver import RegistryResolver

_source: AdapterSource | None = None
_resolver: RegistryResolver | None = None


def adapter_source() -> AdapterSource | None:
    """This process's AdapterSource, or None when vLLM was not started by `tuneloom serve`."""
    global _source
    if _source is None:
        settings = ServingSettings.from_env()
        if settings is not None:
            _source = AdapterSource(settings)
    return _source


def resolver() -> RegistryResolver | None:
    """The resolver registered in this process, if any (the middleware tells it about unloads)."""
    return _resolver


def register() -> None:
    global _resolver
    log_through_vllm()
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from tuneloom.serving import cpu_lora_fix

        cpu_lora_fix.install()
    source = adapter_source()
    if source is not None:
        from vllm.lora.resolver import LoRAResolverRegistry

        from tuneloom.serving.resolver import RegistryResolver

        _resolver = RegistryResolver(source)
        LoRAResolverRegistry.register_resolver("tuneloom", _resolver)


def log_through_vllm() -> None:
    """vLLM configures only its own logger; ours share its handlers so they reach the same output."""
    import logging

    ours, theirs = logging.getLogger("tuneloom"), logging.getLogger("vllm")
    if not ours.handlers and theirs.handlers:
        for handler in theirs.handlers:
            ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False
