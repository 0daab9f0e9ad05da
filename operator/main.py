"""`tuneloom operator`: runs the kopf operator for the whole cluster."""

from __future__ import annotations


def run(*, verbose: bool = False) -> int:
    import kopf

    from tuneloom.operator import handlers  # registers the handlers

    kopf.configure(verbose=verbose)
    config = handlers.CONFIG
    health = f"http://{config.bind_address}:{config.health_port}/healthz"
    # standalone: one operator per cluster; the Helm chart runs a single replica with Recreate.
    kopf.run(clusterwide=True, standalone=True, liveness_endpoint=health)
    return 0
