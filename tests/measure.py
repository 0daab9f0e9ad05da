"""Running the real CLI in a child process and measuring it from outside: exit status, output,
peak resident memory and wall time. Shared by the hostile-input tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# A middle process starts the command and reads its peak RSS from RUSAGE_CHILDREN: in pytest's
# own process that figure is the largest of every child any earlier test ran.
_WRAPPER = """\
import json, resource, subprocess, sys, time
report, timeout, command = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
started = time.monotonic()
code = subprocess.call(command, timeout=timeout)
wall = time.monotonic() - started
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
with open(report, "w") as handle:
    json.dump({"returncode": code, "peak_rss_bytes": peak, "wall_s": wall}, handle)
"""

MB = 1024 * 1024


@dataclass(frozen=True)
class Measured:
    returncode: int
    stdout: str
    stderr: str
    peak_rss_bytes: int
    wall_s: float

    def __str__(self) -> str:
        return f"exit {self.returncode}, peak RSS {self.peak_rss_bytes / MB:.0f} MiB, {self.wall_s:.2f} s"


def run_cli(args: list[str], tmp_path: Path, *, env: dict[str, str] | None = None, timeout: float = 120) -> Measured:
    """`python -I -m tuneloom.cli ARGS` in `tmp_path`; `timeout` is a hard bound, not a target."""
    report = tmp_path / f"measure-{os.getpid()}-{len(list(tmp_path.glob('measure-*')))}.json"
    command = [sys.executable, "-I", "-m", "tuneloom.cli", *args]
    result = subprocess.run(
        [sys.executable, "-I", "-c", _WRAPPER, str(report), str(timeout), *command],
        cwd=tmp_path,
        env=env if env is not None else dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout + 30,
    )
    assert report.exists(), f"the command did not finish within {timeout} s:\n{result.stderr[-3000:]}"
    figures = json.loads(report.read_text())
    report.unlink()
    measured = Measured(stdout=result.stdout, stderr=result.stderr, **figures)
    print(f"measured {' '.join(args[:1])}: {measured}")  # shown with -s or on failure
    return measured


def write_huge_line(path: Path, content_bytes: int, chunk: int = 8 * MB) -> Path:
    """A valid one-line chat record whose assistant content is `content_bytes` long, written in
    chunks so the test itself never holds it."""
    piece = b"word " * (chunk // 5)
    with path.open("wb") as handle:
        handle.write(b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "')
        left = content_bytes
        while left > 0:
            handle.write(piece[:left])
            left -= min(left, len(piece))
        handle.write(b'"}]}\n')
    return path


def line_length(path: Path) -> int:
    """The byte length of a one-line file's line, without its "\\n"."""
    return path.stat().st_size - 1


def assert_no_traceback(measured: Measured) -> None:
    assert "Traceback" not in measured.stderr, measured.stderr[-3000:]
