"""vLLM's LoRA resolver for the Tuneloom registry: an adapter the engine does not hold yet is
fetched from object storage, verified, and handed over as a LoRARequest."""

from __future__ import annotations

import asyncio
import logging

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver

from tuneloom.serving import metrics
from tuneloom.serving.adapters import AdapterSource
from tuneloom.serving.names import AdapterError

log = logging.getLogger("tuneloom.serving")


class RegistryResolver(LoRAResolver):
    def __init__(self, source: AdapterSource):
        self.source = source
        self.resolved: set[str] = set()

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        # Only a pinned name exactly as the middleware writes it (`ns/name@version`): vLLM keeps an
        # adapter under the name it was resolved by, so a floating or short name would stay
        # bound to one version's weights after a new one is published.
        try:
            resolved = await asyncio.to_thread(self.source.resolve, lora_name, require_version=True)
        except AdapterError as exc:
            log.warning("cannot resolve adapter %r: %s", lora_name, exc)
            return None
        if resolved.ref.internal_name != lora_name:
            log.warning(
                "refusing adapter name %r: only pinned names such as %r are resolved",
                lora_name,
                resolved.ref.internal_name,
            )
            return None
        self.resolved.add(lora_name)
        metrics.loaded_adapters.set(len(self.resolved))
        # vLLM replaces lora_int_id with its own counter.
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(resolved.path))

    def forget(self, lora_name: str) -> None:
        self.resolved.discard(lora_name)
        metrics.loaded_adapters.set(len(self.resolved))
