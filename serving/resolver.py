"""vLLM's LoRA resolver for the Tuneloom registry: hands vLLM the verified local copy of a version
that the middleware resolved for this request."""

from __future__ import annotations

import logging

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver

from tuneloom.serving.adapters import AdapterCatalog

log = logging.getLogger("tuneloom.serving")


class RegistryResolver(LoRAResolver):
    def __init__(self, catalog: AdapterCatalog):
        self.catalog = catalog

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        # Only a served name the middleware resolved (`ns/name@version`): vLLM keeps an adapter
        # under the name it was resolved by, so a floating or short name would stay bound to one
        # version's weights after a new one is published. The middleware has already pinned,
        # checked and fetched it; nothing is looked up twice.
        path = self.catalog.resolved_path(lora_name)
        if path is None:
            log.warning("refusing adapter name %r: only versions the server resolved (ns/name@version) load", lora_name)
            return None
        # vLLM replaces lora_int_id with its own counter.
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path))
