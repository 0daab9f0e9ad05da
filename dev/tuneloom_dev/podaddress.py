"""The pod runner's stand-in for a Pod's network identity, in the Python processes of its Pods.

Every Pod of the runner has a loopback address of its own (127.0.0.x), and every such address is
local to every Pod, which a real Pod's address is not. torchrun's c10d rendezvous decides whether
its agent hosts the rendezvous store by asking whether the endpoint is a local address, so on the
runner every agent would think it is rank 0's and race to host it. `install()` makes that check
answer as on a cluster: only the Pod's own address (TUNELOOM_POD_IP), its name and `localhost` are
its own. Loaded, like `servicedns`, by the `sitecustomize` in `podsite/`; torch is patched when a
process imports the rendezvous backend, so processes that never do pay nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

RENDEZVOUS_BACKEND = "torch.distributed.elastic.rendezvous.c10d_rendezvous_backend"


def is_own_address(host: str) -> bool:
    """Whether `host` names this Pod."""
    own = {"localhost", os.environ.get("TUNELOOM_POD_IP"), os.environ.get("HOSTNAME")}
    return host in own - {None, ""}


def _patch(module: ModuleType) -> None:
    module._matches_machine_hostname = is_own_address  # type: ignore[attr-defined]


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds RENDEZVOUS_BACKEND as usual, and patches the module once it has run."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None):
        if fullname != RENDEZVOUS_BACKEND:
            return None
        sys.meta_path.remove(self)  # the real spec, found without this finder; needed only once
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def run_and_patch(module: ModuleType) -> None:
            run(module)
            _patch(module)

        spec.loader.exec_module = run_and_patch  # type: ignore[method-assign]
        return spec


def install() -> None:
    if RENDEZVOUS_BACKEND in sys.modules:
        _patch(sys.modules[RENDEZVOUS_BACKEND])
    else:
        sys.meta_path.insert(0, _PatchOnImport())
