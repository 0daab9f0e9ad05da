"""`tuneloom operator`: runs the kopf operator for the whole cluster."""

from __future__ import annotations

import os


def run(*, verbose: bool = False) -> int:
    import kopf

    from tuneloom.operator import handlers  # noqa: F401  (registers the handlers)

    kopf.configure(verbose=verbose)
    health_port = int(os.environ.get("TUNELOOM_OPERATOR_HEALTH_PORT", "8081"))
    # standalone: one operator per cluster; the Helm chart runs a single replica with Recreate.
    kopf.run(clusterwide=True, standalone=True, liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz")
    return 0
