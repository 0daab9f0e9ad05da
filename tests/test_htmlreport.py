"""report.html: the page a person looks at for one adapter version. Pure rendering first, then
`tuneloom report` on stored versions, then a real tiny-model run whose page a real headless
Chromium renders."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tuneloom.cli import main as cli_main
from tuneloom.names import AdapterId
from tuneloom.registry import EVALUATION_FILE, LOSS_HISTORY_FILE, publish_adapter, split_adapter_uri
from tuneloom.storage import LocalStore, ObjectStore
from tuneloom.trainer.htmlreport import REPORT_FILE, render_report

HOSTILE = "<script>document.title='pwned'</script><img src=https://evil.example/x.png>"
SECTIONS = ("Run", "Promotion", "Loss curves", "Base vs adapter", "General check", "Data", "Held-out prompts")
TITLE = "default/pirate@1: tuneloom report"


class _Page(HTMLParser):
    """The tags, attributes, headings and text of a page, as a browser's parser sees them."""

    def __init__(self, page: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.headings: list[str] = []
        self.text: list[str] = []
        self._heading = False
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._heading = tag in ("h1", "h2")

    def handle_endtag(self, tag: str) -> None:
        self._heading = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._heading:
            self.headings.append(data)

    def images(self) -> list[bytes]:
        """The decoded PNGs of every <img>; a source that is not an inline PNG fails the test."""
        sources = [attrs["src"] or "" for tag, attrs in self.tags if tag == "img"]
        prefix = "data:image/png;base64,"
        assert all(source.startswith(prefix) for source in sources), sources
        return [base64.b64decode(source[len(prefix) :]) for source in sources]


def _manifest(**changes) -> dict:
    manifest = {
        "namespace": "default",
        "name": "pirate",
        "version": "1",
        "kind": "lora",
        "baseModel": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        "datasets": {
            "train": {"uri": f"s3://data/{HOSTILE}.jsonl", "sha256": "ab" * 32, "examples": 32},
            "validation": {"uri": "s3://data/v.jsonl", "examples": 8},
            "warnings": [{"kind": "too_few_examples", "message": f"too few examples: {HOSTILE}"}],
        },
        "metrics": {
            "base": {"validationLoss": 4.1, "tokenAccuracy": 0.05, "exact_match": 0.0, "general.nllShift": 0.0},
            "fewShot": {"exact_match": 0.25},
            "adapter": {"validationLoss": 0.3, "tokenAccuracy": 0.95, "exact_match": 1.0, "general.nllShift": 0.4},
            "steps": 6,
            "history": [{"epoch": 1, "step": 3, "validationLoss": 1.2}, {"epoch": 2, "step": 6, "validationLoss": 0.3}],
        },
        "promotion": {"promoted": False, "reasons": [f"exact_match {HOSTILE} is not above the base model's"]},
    }
    return {**manifest, **changes}


SAMPLES = [
    {
        "check": "heldOut",
        "line": 7,
        "prompt": HOSTILE,
        "reference": "Arr",
        "base": f"base says {HOSTILE}",
        "adapter": "Arr",
        "fewShot": "Ahoy",
        "baseScores": {"exact_match": False},
        "adapterScores": {"exact_match": True},
        "fewShotScores": {"exact_match": False},
    },
    {
        "check": "general",
        "line": 1,
        "prompt": "What is 2 + 2?",
        "reference": "4",
        "base": "4",
        "adapter": "Arr, 4",
        "baseScores": {},
        "adapterScores": {"agrees": False},
    },
]
HISTORY = {
    "train": [{"step": step, "loss": 4.0 / step} for step in range(1, 7)],
    "validation": _manifest()["metrics"]["history"],
}


def test_user_text_stays_text_and_the_page_references_nothing_outside_it() -> None:
    page = _Page(render_report(_manifest(), SAMPLES, HISTORY))
    # The hostile prompt, answer, reason, warning and URI are text: no script, no foreign image.
    assert [tag for tag, _ in page.tags if tag in ("script", "link", "iframe", "object")] == []
    assert sum(HOSTILE in text for text in page.text) >= 5
    for tag, attrs in page.tags:
        for name in ("src", "href", "action"):
            assert attrs.get(name) is None or attrs[name].startswith("data:image/png;base64,"), (tag, attrs)
    assert page.headings == ["Adapter default/pirate@1", *SECTIONS]
    charts = page.images()
    assert len(charts) == 2 and all(chart.startswith(b"\x89PNG\r\n\x1a\n") for chart in charts)
    assert "not promoted" in "".join(page.text)


def test_a_long_answer_is_cut_in_the_page() -> None:
    long = dict(SAMPLES[0], adapter="x" * 50_000)
    text = "".join(_Page(render_report(_manifest(), [long], HISTORY)).text)
    assert "x" * 2000 in text and "x" * 2001 not in text and "(48000 more characters)" in text


def test_a_version_without_loss_history_still_renders_its_validation_curve() -> None:
    """Published before loss_history.json: the manifest's validation history is drawn, and the
    page says the training curve was not recorded."""
    manifest = _manifest()
    del manifest["datasets"]["warnings"]
    text = "".join((page := _Page(render_report(manifest, SAMPLES, None))).text)
    assert "The training loss curve was not recorded for this version." in text
    assert "Data-quality warnings were not recorded for this version." in text
    assert len(page.images()) == 2  # the validation curve and the metrics chart
    bare = _manifest(metrics={"base": {}, "adapter": {}})
    text = "".join((page := _Page(render_report(bare, [], None))).text)
    assert "The validation loss curve was not recorded for this version." in text and page.images() == []


def test_the_loss_section_states_the_overfitting_verdict() -> None:
    def text_of(overfitting: dict | None) -> str:
        metrics = {**_manifest()["metrics"], **({"overfitting": overfitting} if overfitting else {})}
        return "".join(_Page(render_report(_manifest(metrics=metrics), SAMPLES, HISTORY)).text)

    reason = f"validation loss rose at steps 4 and 6 {HOSTILE}"
    assert f"Overfitting: {reason}" in text_of({"detected": True, "rule": "risingValidationLoss", "reason": reason})
    assert "No sign of overfitting" in text_of({"detected": False, "rule": None, "reason": None})
    assert "Overfitting was not checked for this version." in text_of(None)


@pytest.mark.parametrize(
    ("uri", "root", "adapter"),
    [
        ("out/store/adapters/default/pirate/3", "out/store", AdapterId("default", "pirate", "3")),
        ("s3://bucket/root/adapters/team-b/pirate", "s3://bucket/root", AdapterId("team-b", "pirate")),
        ("file:///srv/adapters/x/adapters/ns/pirate/12/", "file:///srv/adapters/x", AdapterId("ns", "pirate", "12")),
        ("adapters/default/pirate/1", ".", AdapterId("default", "pirate", "1")),
    ],
)
def test_adapter_uris_split_into_store_and_version(uri: str, root: str, adapter: AdapterId) -> None:
    assert split_adapter_uri(uri) == (root, adapter)


@pytest.mark.parametrize("uri", ["out/store", "out/store/adapters/default", "out/adapters/default/Pirate/1"])
def test_a_uri_that_names_no_adapter_version_is_refused(uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["report", uri]) == 2
    assert "tuneloom report:" in capsys.readouterr().err


def _publish_old_version(store: ObjectStore, tmp_path: Path) -> None:
    """A version as the trainer wrote it before report.html: weights, evaluation.json, manifest."""
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / EVALUATION_FILE).write_text(json.dumps(SAMPLES))
    manifest = _manifest()
    del manifest["datasets"]["warnings"]
    for field in ("namespace", "name", "version"):
        del manifest[field]
    files = {path.name: path for path in folder.iterdir()}
    publish_adapter(store, "default", "pirate", files, manifest)


def test_tuneloom_report_renders_a_version_published_before_report_html(
    store: ObjectStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _publish_old_version(store, tmp_path)
    output = tmp_path / "page.html"
    # Without /VERSION: the latest.
    assert cli_main(["report", store.describe("adapters/default/pirate"), "--output", str(output)]) == 0
    assert capsys.readouterr().out.strip() == str(output)
    page = _Page(output.read_text())
    assert page.headings[1:] == list(SECTIONS)
    assert "The training loss curve was not recorded for this version." in "".join(page.text)
    assert sum(HOSTILE in text for text in page.text) >= 3


def test_tuneloom_report_refuses_a_damaged_evaluation_file_and_an_unwritable_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = LocalStore(tmp_path / "store")
    _publish_old_version(store, tmp_path)
    unwritable = tmp_path / "no-such-folder" / "page.html"
    assert cli_main(["report", str(tmp_path / "store/adapters/default/pirate"), "--output", str(unwritable)]) == 1
    assert f"--output {unwritable}: No such file or directory" in capsys.readouterr().err
    store.put_bytes(f"adapters/default/pirate/1/{EVALUATION_FILE}", b"[]")
    output = tmp_path / "x.html"
    assert cli_main(["report", str(tmp_path / "store/adapters/default/pirate/1"), "--output", str(output)]) == 1
    assert "checksum mismatch" in capsys.readouterr().err and not output.exists()


def test_tuneloom_report_needs_no_torch(tmp_path: Path) -> None:
    _publish_old_version(LocalStore(tmp_path / "store"), tmp_path)
    uri, output = tmp_path / "store/adapters/default/pirate/1", tmp_path / "page.html"
    code = (
        "import sys\n"
        "from tuneloom.cli import main\n"
        f"assert main(['report', {str(uri)!r}, '--output', {str(output)!r}]) == 0\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert output.read_text().startswith("<!DOCTYPE html>")


# --- a real run, and a real browser -----------------------------------------------------------


@pytest.fixture(scope="module")
def trained_version(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of a version the trainer published (local store) after a tiny run whose held-out
    prompts include a hostile one."""
    from tuneloom.jobfile import parse_job
    from tuneloom.trainer.main import run

    from .test_train import PIRATE, _dataset, _job

    folder = tmp_path_factory.mktemp("report-run")
    validation = folder / "validation.jsonl"
    with validation.open("w") as stream:
        for question in (HOSTILE, "Question number 90: what is 1 plus 1?", "Question number 91: what is 2 plus 2?"):
            record = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": PIRATE}]}
            stream.write(json.dumps(record) + "\n")
    spec = _job(tiny_model_dir, _dataset(folder / "train.jsonl", 24), str(folder / "store"))
    spec["spec"]["dataset"]["validation"] = str(validation)
    adapter = run(parse_job(spec))
    return folder / "store" / adapter.id.store_prefix


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    # Debian's chromium is a test requirement (scripts/bootstrap.sh installs it with the dev tools).
    binary = shutil.which("chromium")
    assert binary, "Debian's chromium is missing: run `make env-dev` (or apt-get install chromium)"
    command = [binary, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=True)


def test_the_published_version_lists_its_report_and_loss_history(trained_version: Path) -> None:
    manifest = json.loads((trained_version / "manifest.json").read_text())
    assert {REPORT_FILE, LOSS_HISTORY_FILE, EVALUATION_FILE} <= set(manifest["files"])
    history = json.loads((trained_version / LOSS_HISTORY_FILE).read_text())
    steps = manifest["metrics"]["steps"]
    assert [point["step"] for point in history["train"]] == list(range(1, steps + 1))
    assert history["validation"] == manifest["metrics"]["history"] and len(history["validation"]) == 3
    samples = json.loads((trained_version / EVALUATION_FILE).read_text())
    assert samples[0]["check"] == "heldOut" and samples[0]["prompt"] == HOSTILE
    assert {w["kind"] for w in manifest["datasets"]["warnings"]} >= {"too_few_examples", "small_held_out"}


def test_chromium_renders_the_report_with_its_charts(trained_version: Path, tmp_path: Path) -> None:
    report = trained_version / REPORT_FILE
    dom = _chromium("--dump-dom", report.as_uri(), profile=tmp_path / "profile").stdout
    page = _Page(dom)
    assert page.headings == ["Adapter default/pirate@1", *SECTIONS]
    # The hostile prompt did not run: the title is the page's own, and the prompt is shown as text.
    assert re.search(r"<title>(.*?)</title>", dom).group(1) == TITLE
    assert any(HOSTILE in text for text in page.text)
    charts = page.images()
    assert len(charts) == 2, "the loss curves and the base-vs-adapter chart"
    assert all(chart.startswith(b"\x89PNG\r\n\x1a\n") and len(chart) > 5_000 for chart in charts)

    from PIL import Image

    shot = tmp_path / "shot.png"
    _chromium(f"--screenshot={shot}", "--window-size=1280,2400", report.as_uri(), profile=tmp_path / "profile")
    with Image.open(shot) as image:
        assert image.size == (1280, 2400)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "a blank page has one colour"


def test_tuneloom_report_draws_the_same_page_from_the_store(
    trained_version: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "again.html"
    assert cli_main(["report", str(trained_version), "--output", str(output)]) == 0
    assert capsys.readouterr().out.strip() == str(output)
    stored, drawn = _Page((trained_version / REPORT_FILE).read_text()), _Page(output.read_text())
    assert drawn.headings == stored.headings and len(drawn.images()) == len(stored.images()) == 2
    assert "not recorded" not in "".join(drawn.text)
