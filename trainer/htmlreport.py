"""report.html: one adapter version as a person looks at it, in one self-contained page.

Pure: the version's manifest, the samples of its evaluation.json and its loss history (None for a
version published before the history was stored) go in, an HTML string comes out. Charts are
matplotlib PNGs inlined as data: URIs and the styles are inline, so the page needs no network.
Every text from the version (prompts and answers are user data) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # matplotlib is imported by the charts that draw: about 0.4 s of every trainer's start-up
    from matplotlib.figure import Figure

REPORT_FILE = "report.html"
# Longer prompts and answers are cut in the page (a data line may hold 4 MiB); the files keep them whole.
MAX_SHOWN_CHARS = 2000
GENERAL_PREFIX = "general."
# Held-out figures that are not shares in [0, 1], left out of the bar chart (the table has them).
_NOT_RATIOS = frozenset({"validationLoss", "rewardMargin"})  # rewardMargin: method: dpo, in nats
_MODELS = (("base", "base"), ("fewShot", "few-shot"), ("adapter", "adapter"))

_STYLE = """
body { font-family: sans-serif; margin: 2em auto; padding: 0 1em; max-width: 80em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ccc; padding: .3em .6em;
vertical-align: top; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.text { white-space: pre-wrap; max-width: 28em; overflow-wrap: anywhere; }
.pass { color: #1a7f37; } .fail, .bad { color: #c62828; } .note { color: #666; font-style: italic; }
.verdict { font-size: 1.2em; font-weight: bold; } img { max-width: 100%; }
"""


def render_report(
    manifest: Mapping[str, Any],
    samples: Sequence[Mapping[str, Any]],
    loss_history: Mapping[str, Any] | None,
) -> str:
    """The page for one version; `samples` are evaluation.json's entries (held-out and general)."""
    held_out = [sample for sample in samples if sample.get("check", "heldOut") == "heldOut"]
    general = [sample for sample in samples if sample.get("check") == "general"]
    metrics = manifest.get("metrics") or {}
    title = f"{manifest.get('namespace')}/{manifest.get('name')}@{manifest.get('version')}"
    body = [
        f"<h1>Adapter {_text(title)}</h1>",
        _summary(manifest),
        _promotion(manifest.get("promotion")),
        _loss_section(metrics, loss_history),
        _metrics_section(metrics),
        _general_section(metrics, general),
        _data_section(manifest.get("datasets") or {}),
        _held_out_section(held_out),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_text(title)}: tuneloom report</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def _text(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _shown(value: Any) -> str:
    """A user's text, escaped, cut at MAX_SHOWN_CHARS with a note saying how much was left out."""
    text = str(value)
    if len(text) <= MAX_SHOWN_CHARS:
        return _text(text)
    left_out = len(text) - MAX_SHOWN_CHARS
    return f'{_text(text[:MAX_SHOWN_CHARS])}<span class="note">… ({left_out} more characters)</span>'


def _figure(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-" if value is None else _text(value)
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _note(text: str) -> str:
    return f'<p class="note">{_text(text)}</p>'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Cells are HTML already (escaped by the caller); no header row when `header` is empty."""
    head = "".join(f"<th>{_text(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    return (f"<table><thead><tr>{head}</tr></thead>" if head else "<table>") + f"<tbody>{body}</tbody></table>"


def _num(value: Any) -> str:
    return f'<td class="num">{_figure(value)}</td>'


def _cell(value: Any) -> str:
    return f'<td class="text">{_shown(value)}</td>'


def _png(figure: Figure, alt: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{_text(alt)}" src="data:image/png;base64,{encoded}">'


def _summary(manifest: Mapping[str, Any]) -> str:
    metrics = manifest.get("metrics") or {}
    base_model = (manifest.get("baseModel") or {}).get("name")
    facts = [
        ("base model", base_model),
        ("kind", manifest.get("kind")),
        # Absent from the page the trainer writes: the commit that sets it comes after.
        ("created", manifest.get("createdAt")),
        ("tuneloom", manifest.get("tuneloomVersion")),
        ("optimizer steps", metrics.get("steps")),
        ("best step", metrics.get("bestStep")),
        ("stopped early", metrics.get("stoppedEarly")),
        ("tokens seen", metrics.get("tokensSeen")),
        ("training seconds", metrics.get("trainSeconds")),
        ("estimated seconds", (metrics.get("estimate") or {}).get("seconds")),
        ("peak memory bytes", metrics.get("peakMemoryBytes")),
        ("preempted at steps", ", ".join(map(str, metrics.get("preemptedAtSteps") or [])) or "none"),
    ]
    rows = [[f"<th>{_text(name)}</th>", _num(value)] for name, value in facts if value is not None]
    return "<h2>Run</h2>" + _table([], rows)


def _promotion(promotion: Mapping[str, Any] | None) -> str:
    # Manifests written before the gate existed have none: they count as promoted.
    promotion = promotion or {"promoted": True, "reasons": []}
    if promotion.get("promoted", True):
        verdict = '<p class="verdict pass">promoted: a bare name serves the newest promoted version</p>'
    else:
        verdict = '<p class="verdict fail">not promoted: a bare name skips this version</p>'
    reasons = "".join(f"<li>{_text(reason)}</li>" for reason in promotion.get("reasons") or [])
    return "<h2>Promotion</h2>" + verdict + (f"<ul>{reasons}</ul>" if reasons else "")


def _loss_section(metrics: Mapping[str, Any], loss_history: Mapping[str, Any] | None) -> str:
    # A version published before loss_history.json existed still has its validation history in the manifest.
    train = list((loss_history or {}).get("train") or [])
    validation = list((loss_history or {}).get("validation") or metrics.get("history") or [])
    notes = [_overfitting_line(metrics.get("overfitting"))]
    if not train:
        notes.append(_note("The training loss curve was not recorded for this version."))
    if not validation:
        notes.append(_note("The validation loss curve was not recorded for this version."))
    if not (train or validation):
        return "<h2>Loss curves</h2>" + "".join(notes)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 3.6))
    axes = figure.add_subplot()
    if train:
        axes.plot([p["step"] for p in train], [p["loss"] for p in train], label="training loss", linewidth=1)
    if validation:
        axes.plot(
            [p["step"] for p in validation],
            [p["validationLoss"] for p in validation],
            marker="o",
            label="validation loss",
        )
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats per token)")
    axes.grid(alpha=0.3)
    axes.legend()
    return "<h2>Loss curves</h2>" + _png(figure, "training and validation loss by step") + "".join(notes)


def _overfitting_line(verdict: Mapping[str, Any] | None) -> str:
    if not verdict:
        return _note("Overfitting was not checked for this version.")
    if verdict.get("detected"):
        return f'<p class="bad">Overfitting: {_text(verdict.get("reason"))}</p>'
    return _note("No sign of overfitting in the evaluation history.")


def _measured(figures: Mapping[str, Any] | None) -> dict[str, Any]:
    """A model's figures that were measured (a stored manifest holds None for the others)."""
    return {name: value for name, value in (figures or {}).items() if value is not None}


def _metrics_section(metrics: Mapping[str, Any]) -> str:
    measured = {key: _measured(metrics.get(key)) for key, _ in _MODELS}
    columns = [(key, label) for key, label in _MODELS if measured[key]]
    names = [name for key, _ in columns for name in measured[key] if not name.startswith(GENERAL_PREFIX)]
    names = list(dict.fromkeys(names))
    if not names:
        return "<h2>Base vs adapter</h2>" + _note("No held-out metrics were recorded for this version.")
    rows = [[f"<th>{_text(name)}</th>", *(_num(measured[key].get(name)) for key, _ in columns)] for name in names]
    table = _table(["held-out metric", *(label for _, label in columns)], rows)
    ratios = [name for name in names if name not in _NOT_RATIOS]
    chart = _bars(measured, columns, ratios) if ratios else ""
    return "<h2>Base vs adapter</h2>" + table + chart


def _bars(metrics: Mapping[str, Any], columns: Sequence[tuple[str, str]], names: Sequence[str]) -> str:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 3.2))
    axes = figure.add_subplot()
    width = 0.8 / len(columns)
    for offset, (key, label) in enumerate(columns):
        values = [metrics[key].get(name) or 0.0 for name in names]
        axes.bar([i + offset * width for i in range(len(names))], values, width, label=label)
    axes.set_xticks([i + width * (len(columns) - 1) / 2 for i in range(len(names))], names)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("share of held-out prompts / tokens")
    axes.legend()
    return _png(figure, "held-out metrics: base vs few-shot vs adapter")


def _general_section(metrics: Mapping[str, Any], samples: Sequence[Mapping[str, Any]]) -> str:
    base, adapter = _measured(metrics.get("base")), _measured(metrics.get("adapter"))
    names = [name for name in adapter if name.startswith(GENERAL_PREFIX)]
    if not names:
        return "<h2>General check</h2>" + _note("The general-ability check did not run for this version.")
    rows = [[f"<th>{_text(name)}</th>", _num(base.get(name)), _num(adapter.get(name))] for name in names]
    parts = ["<h2>General check</h2>", _table(["general metric", "base", "adapter"], rows)]
    if samples:
        answers = [
            [_cell(s.get("prompt", f"line {s.get('line')}")), _cell(s.get("base", "")), _answer(s, "adapter")]
            for s in samples
        ]
        parts.append(_table(["prompt", "base", "adapter"], answers))
    return "".join(parts)


def _data_section(datasets: Mapping[str, Any]) -> str:
    rows = []
    for part in ("train", "validation", "general"):
        info = datasets.get(part)
        if isinstance(info, Mapping):
            details = "; ".join(f"{key} {value}" for key, value in info.items() if key != "examples")
            rows.append([f"<th>{_text(part)}</th>", _num(info.get("examples")), _cell(details)])
    parts = ["<h2>Data</h2>", _table(["set", "examples", "source"], rows)]
    warnings = datasets.get("warnings")
    if warnings is None:
        parts.append(_note("Data-quality warnings were not recorded for this version."))
    elif not warnings:
        parts.append("<p>No data-quality warnings.</p>")
    else:
        items = "".join(f"<li>{_text(w.get('kind'))}: {_shown(w.get('message'))}</li>" for w in warnings)
        parts.append(f"<p>Data-quality warnings:</p><ul>{items}</ul>")
    return "".join(parts)


def _answer(sample: Mapping[str, Any], model: str) -> str:
    """One model's answer with its scores marked pass or fail."""
    scores = sample.get(f"{model}Scores") or {}
    marks = " ".join(
        f'<span class="{"pass" if ok else "fail"}">{_text(name)} {"yes" if ok else "no"}</span>'
        for name, ok in scores.items()
    )
    return f'<td class="text">{_shown(sample.get(model, ""))}' + (f"<br>{marks}" if marks else "") + "</td>"


def _held_out_section(samples: Sequence[Mapping[str, Any]]) -> str:
    if not samples:
        return "<h2>Held-out prompts</h2>" + _note("No held-out prompts were answered (evaluation.metrics is empty).")
    few_shot = any("fewShot" in sample for sample in samples)
    header = ["line", "prompt", "expected", "base", *(["few-shot"] if few_shot else []), "adapter"]
    rows = [
        [
            _num(sample.get("line")),
            # evaluation.json has held the prompt since report.html; older ones name the line only.
            _cell(sample.get("prompt", "not recorded")),
            _cell(sample.get("reference", "")),
            _answer(sample, "base"),
            *([_answer(sample, "fewShot")] if few_shot else []),
            _answer(sample, "adapter"),
        ]
        for sample in samples
    ]
    return "<h2>Held-out prompts</h2>" + _table(header, rows)
