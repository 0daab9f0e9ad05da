"""`tuneloom operator`: runs the kopf operator for the whole cluster."""

from __future__ import annotations

import logging


def run(*, verbose: bool = False) -> int:
    import kopf

    from tuneloom.operator import handlers  # registers the handlers

    # kopf installs its own log handler; the CLI's would print every line a second time.
    logging.getLogger().handlers.clear()
    kopf.configure(verbose=verbose)
    if not verbose:
        # kopf reports every handler run at INFO: one line per watch event of every object.
        # Failures still come through as warnings and errors, and the reconcilers log what they do.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    config = handlers.CONFIG
    health = f"http://{config.bind_address}:{config.health_port}/healthz"
    # standalone: one operator per cluster; the Helm chart runs a single replica with Recreate.
    kopf.run(clusterwide=True, standalone=True, liveness_endpoint=health)
    return 0
