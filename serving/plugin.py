"""The `vllm.general_plugins` entry point. vLLM calls `register` in every process it starts."""

from __future__ import annotations

from tuneloom.serving.adapters import AdapterCatalog, ServingSettings

_catalog: AdapterCatalog | None = None


def adapter_catalog() -> AdapterCatalog | None:
    """This process's AdapterCatalog, or None when vLLM was not started by `tuneloom serve`."""
    global _catalog
    if _catalog is None:
        settings = ServingSettings.from_env()
        if settings is not None:
            _catalog = AdapterCatalog(settings)
    return _catalog


def register() -> None:
    log_through_vllm()
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from tuneloom.serving import cpu_lora_fix

        cpu_lora_fix.install()
    catalog = adapter_catalog()
    if catalog is not None:
        from vllm.lora.resolver import LoRAResolverRegistry

        from tuneloom.serving.resolver import RegistryResolver

        LoRAResolverRegistry.register_resolver("tuneloom", RegistryResolver(catalog))


def log_through_vllm() -> None:
    """vLLM configures only its own logger; ours share its handlers so they reach the same output."""
    import logging

    ours, theirs = logging.getLogger("tuneloom"), logging.getLogger("vllm")
    if not ours.handlers and theirs.handlers:
        for handler in theirs.handlers:
            ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False
