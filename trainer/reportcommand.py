"""`tuneloom report URI`: report.html of any stored version, drawn again from what the version
holds (its manifest, evaluation.json and loss history), so versions published before report.html
existed get one too. Needs matplotlib, not torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tuneloom.registry import EVALUATION_FILE, LOSS_HISTORY_FILE, read_adapter, read_version_file, split_adapter_uri
from tuneloom.storage import StorageError, open_store
from tuneloom.trainer.htmlreport import render_report


def report_command(uri: str, output: str | None) -> int:
    """Writes the version's report to `output` (default: report-NAMESPACE-NAME-VERSION.html here) and
    prints its path; exit status 2 for a URI that names no adapter, 1 when the store or the output fails."""
    try:
        root, adapter_id = split_adapter_uri(uri)
    except ValueError as exc:
        print(f"error: tuneloom report: {exc}", file=sys.stderr)
        return 2
    try:
        store = open_store(root)
        adapter = read_adapter(store, adapter_id.namespace, adapter_id.name, adapter_id.version)
        samples = read_version_file(store, adapter, EVALUATION_FILE)
        history = read_version_file(store, adapter, LOSS_HISTORY_FILE)
    except StorageError as exc:
        print(f"error: tuneloom report: {exc}", file=sys.stderr)
        return 1
    page = render_report(
        adapter.manifest.model_dump(mode="json"),
        [] if samples is None else json.loads(samples),
        None if history is None else json.loads(history),
    )
    path = Path(output or f"report-{adapter.namespace}-{adapter.name}-{adapter.version}.html")
    try:
        path.write_text(page, encoding="utf-8")
    except OSError as exc:
        print(f"error: tuneloom report: --output {path}: {exc.strerror}; choose a writable file", file=sys.stderr)
        return 1
    print(path)
    return 0
