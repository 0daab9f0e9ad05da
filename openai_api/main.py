"""`tuneloom api`: the server's entry point, and `tuneloom api new-key`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from .keys import KeysFileError, add_key
from .settings import ApiSettings

log = logging.getLogger("tuneloom.api")


def serve(settings: ApiSettings) -> int:
    import uvicorn

    from .app import create_app
    from .interface import Engine

    try:
        engine: Engine
        if settings.kubernetes:
            from .kubeengine import KubeEngine

            engine = KubeEngine(settings)
        else:
            from .engine import ApiEngine

            engine = ApiEngine(settings)
    except KeysFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    where = "FineTuneJobs on the cluster" if settings.kubernetes else f"state in {settings.state_path()}"
    log.info("%s; store %s", where, settings.store)
    # No access log: uvicorn's would print query strings; the metrics count every request.
    uvicorn.run(create_app(engine), host=settings.host, port=settings.port, access_log=False, log_level="info")
    return 0


def new_key(project: str, keys_file: Path) -> int:
    try:
        key = add_key(keys_file, project)
    except KeysFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(key)  # the only time the key is shown; the file keeps its SHA-256
    print(f"added a key for project {project!r} to {keys_file}; store it now, it is not kept", file=sys.stderr)
    return 0
