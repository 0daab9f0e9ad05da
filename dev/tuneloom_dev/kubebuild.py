"""Build a real kube-apiserver and kube-controller-manager from Debian's `kubernetes` source package.

No registry we can reach ships these binaries (nor k3s, kind or a container engine), but Debian
bookworm carries the full upstream v1.20.2 tree, `vendor/` included. We build the two binaries once
into a cache outside the repository (`$TUNELOOM_CACHE_DIR/kube/<debian-version>/bin/`) so every
later test run and `tuneloom dev cluster up` start in seconds.

One patch is required: the vendored `modern-go/reflect2` (v1.0.1) and `json-iterator/go` segfault
when compiled with Go >= 1.18 (bookworm has 1.19), so both vendor directories are replaced with
the newer sources Debian ships as -dev packages.

The source package comes from the archives the machine's own apt sources name (a mirror or proxy
included), as deb-src entries; only a machine with none for bookworm falls back to Debian's hosts.

Run `python -m tuneloom_dev.kubebuild` to build ahead of time (it logs progress).
"""

from __future__ import annotations

import collections
import fcntl
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tuneloom.models import cache_dir
from tuneloom_dev.aptsources import ETC_APT, AptSource, deb_src_entries, render_deb822, system_sources

log = logging.getLogger("tuneloom_dev.kubebuild")

SOURCE_PACKAGE = "kubernetes"
# Debian's version of the source package; "really1.20.2" means the tree is upstream v1.20.2.
DEBIAN_VERSION = "1.20.5+really1.20.2-1.1+deb12u1"
UPSTREAM_VERSION = "v1.20.2"
BINARIES = ("kube-apiserver", "kube-controller-manager")
STAMP_NAME = ".tuneloom-build.json"

# The suites of Debian's archive that carry the version: a bookworm point release and bookworm-security.
SOURCE_SUITES = ("bookworm", "bookworm-updates", "bookworm-security")
_DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# Debian's own hosts, for a machine whose apt sources name none of SOURCE_SUITES.
_FALLBACK_SOURCES = (
    AptSource(("deb-src",), "http://deb.debian.org/debian", SOURCE_SUITES[:2], ("main",), _DEBIAN_KEYRING),
    AptSource(("deb-src",), "http://deb.debian.org/debian-security", SOURCE_SUITES[2:], ("main",), _DEBIAN_KEYRING),
)

# What building needs: the Go toolchain, the replacement vendor sources, `dpkg-source` for
# `apt-get source`, make, and rsync (Kubernetes' build scripts copy their tools with it).
BUILD_PACKAGES = (
    "golang-go",
    "golang-github-modern-go-reflect2-dev",
    "golang-github-json-iterator-go-dev",
    "dpkg-dev",
    "make",
    "rsync",
)
ETCD_PACKAGE = "etcd-server"

# Vendor directory (relative to the tree) -> Debian's source of the same Go package.
_VENDOR_REPLACEMENTS = {
    "vendor/github.com/modern-go/reflect2": Path("/usr/share/gocode/src/github.com/modern-go/reflect2"),
    "vendor/github.com/json-iterator/go": Path("/usr/share/gocode/src/github.com/json-iterator/go"),
}

_PROGRESS_INTERVAL_S = 30.0
_LOG_TAIL_LINES = 60

# `apt-get update` is slow and its result lasts for the process; run it at most once.
_apt_updated = False
_apt_lock = threading.Lock()


class KubeBuildError(RuntimeError):
    """The binaries could not be built, or a prerequisite is missing and cannot be installed."""


@dataclass(frozen=True)
class KubeBinaries:
    """Paths of the built control-plane binaries."""

    apiserver: Path
    controller_manager: Path


def kube_root(cache: Path | None = None) -> Path:
    """The build cache for this Debian version (outside the repository)."""
    return (cache if cache is not None else cache_dir()) / "kube" / DEBIAN_VERSION


def kube_bin_dir(cache: Path | None = None) -> Path:
    return kube_root(cache) / "bin"


def find_kube_binaries(cache: Path | None = None) -> KubeBinaries | None:
    """The cached binaries, or None unless both exist and a stamp records a finished build.

    The stamp is written last, so a directory left by an interrupted copy never counts as built.
    """
    bin_dir = kube_bin_dir(cache)
    paths = [bin_dir / name for name in BINARIES]
    if not (bin_dir / STAMP_NAME).is_file() or not all(p.is_file() and os.access(p, os.X_OK) for p in paths):
        return None
    return KubeBinaries(apiserver=paths[0], controller_manager=paths[1])


def ensure_kube_binaries(cache: Path | None = None) -> KubeBinaries:
    """Return the cached binaries, building them first (minutes) if they are missing."""
    found = find_kube_binaries(cache)
    if found is not None:
        return found
    root = kube_root(cache)
    root.mkdir(parents=True, exist_ok=True)
    # Two processes (say, two pytest sessions) must not both spend minutes building.
    with _file_lock(root / ".build.lock"):
        found = find_kube_binaries(cache)
        if found is not None:
            return found
        _build_into(root)
    found = find_kube_binaries(cache)
    if found is None:
        raise KubeBuildError(f"build finished but binaries are missing from {kube_bin_dir(cache)}")
    return found


def ensure_etcd() -> Path:
    """Path of `etcd` (Debian's etcd-server 3.4), installing the package first when root."""
    found = shutil.which("etcd") or next((p for p in ("/usr/bin/etcd", "/usr/sbin/etcd") if Path(p).is_file()), None)
    if found:
        return Path(found)
    ensure_packages([ETCD_PACKAGE])
    found = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").is_file() else None)
    if not found:
        raise KubeBuildError(f"{ETCD_PACKAGE} is installed but no etcd binary was found")
    return Path(found)


def missing_packages(packages: Sequence[str]) -> list[str]:
    """The Debian packages from `packages` that are not installed."""
    missing = []
    for package in packages:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
        )
        if result.returncode != 0 or "install ok installed" not in result.stdout:
            missing.append(package)
    return missing


def ensure_packages(packages: Sequence[str]) -> None:
    """Install missing Debian packages when running as root; otherwise say how to."""
    if shutil.which("dpkg-query") is None:
        raise KubeBuildError("building the local Kubernetes control plane needs a Debian system (dpkg)")
    missing = missing_packages(packages)
    if not missing:
        return
    if os.geteuid() != 0:
        names = " ".join(missing)
        raise KubeBuildError(f"missing Debian packages {names}; install them with: sudo apt-get install -y {names}")
    global _apt_updated
    with _apt_lock:
        if not _apt_updated:
            log.info("apt-get update (to install %s)", " ".join(missing))
            _run(["apt-get", "update", "-q"])
            _apt_updated = True
        log.info("installing Debian packages: %s", " ".join(missing))
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env)


def _build_into(root: Path) -> None:
    ensure_packages(BUILD_PACKAGES)
    started = time.monotonic()
    # A scratch dir outside the repository: the tree plus Go's caches take about 2.2 GB.
    scratch = Path(tempfile.mkdtemp(prefix="tuneloom-kubebuild-"))
    log.info("building %s %s in %s", " and ".join(BINARIES), DEBIAN_VERSION, scratch)
    tree = _fetch_source(scratch)
    _replace_vendored(tree)
    _make(tree, scratch)
    _install(tree, root, started)
    # Kept on failure (the exception propagates before this) so the log and tree can be inspected.
    shutil.rmtree(scratch, ignore_errors=True)
    log.info("built %s in %.0f s", root / "bin", time.monotonic() - started)


def source_entries(etc_apt: Path = ETC_APT) -> list[AptSource]:
    """deb-src entries for the source package: the archives (mirrors included) the machine's apt
    sources use for SOURCE_SUITES, else Debian's own hosts."""
    return deb_src_entries(system_sources(etc_apt), SOURCE_SUITES) or list(_FALLBACK_SOURCES)


def _fetch_source(scratch: Path) -> Path:
    """Download and unpack the source package using a private deb-src list.

    The system's apt configuration is left alone: the source list, the index files and apt's
    caches all live in the scratch dir. apt.conf (a proxy, say) still applies.
    """
    apt_dir = scratch / "apt"
    (apt_dir / "lists" / "partial").mkdir(parents=True)
    (apt_dir / "cache" / "archives" / "partial").mkdir(parents=True)
    (apt_dir / "sources.list.d").mkdir()
    (apt_dir / "sources.list").write_text("")
    sources = source_entries()
    (apt_dir / "sources.list.d" / "tuneloom-src.sources").write_text(render_deb822(sources))
    log.info("source package from %s", ", ".join(f"{s.uri} ({' '.join(s.suites)})" for s in sources))
    options = [
        f"-oDir::Etc::SourceList={apt_dir / 'sources.list'}",
        f"-oDir::Etc::SourceParts={apt_dir / 'sources.list.d'}",
        f"-oDir::State::Lists={apt_dir / 'lists'}",
        f"-oDir::Cache={apt_dir / 'cache'}",
    ]
    log.info("downloading Debian source index")
    _run(["apt-get", *options, "update", "-q"])
    src = scratch / "src"
    src.mkdir()
    log.info("downloading and unpacking source package %s=%s", SOURCE_PACKAGE, DEBIAN_VERSION)
    _run(["apt-get", *options, "source", "-q", f"{SOURCE_PACKAGE}={DEBIAN_VERSION}"], cwd=src)
    trees = [p for p in src.iterdir() if p.is_dir() and (p / "Makefile").is_file() and (p / "vendor").is_dir()]
    if len(trees) != 1:
        raise KubeBuildError(f"expected one unpacked source tree in {src}, found {[p.name for p in src.iterdir()]}")
    return trees[0]


def _replace_vendored(tree: Path) -> None:
    """Swap the two vendored packages that crash under Go >= 1.18 for Debian's newer sources."""
    for rel, debian_src in _VENDOR_REPLACEMENTS.items():
        target = tree / rel
        if not debian_src.is_dir():
            raise KubeBuildError(f"{debian_src} is missing: the replacement sources for {rel}")
        log.info("patching %s with %s", rel, debian_src)
        shutil.rmtree(target)
        target.mkdir(parents=True)
        for source in debian_src.iterdir():
            # Only the package itself: tests and sub-packages are not imported by Kubernetes.
            if source.is_file() and source.suffix in (".go", ".s") and not source.name.endswith("_test.go"):
                shutil.copy2(source, target / source.name)
        licence = debian_src / "LICENSE"
        if licence.is_file():
            shutil.copy2(licence, target / "LICENSE")


def _make(tree: Path, scratch: Path) -> None:
    what = " ".join(f"cmd/{name}" for name in BINARIES)
    env = {
        **os.environ,
        # Keep Go's caches in the scratch dir so nothing outside it grows.
        "GOCACHE": str(scratch / "gocache"),
        "GOPATH": str(scratch / "gopath"),
        # The tarball has no .git, from which the build would otherwise derive the version.
        "KUBE_GIT_VERSION": UPSTREAM_VERSION,
        "KUBE_GIT_TREE_STATE": "clean",
    }
    log.info("building with make WHAT=%r (about 4 min on 2 cores)", what)
    _run_streaming(["make", f"WHAT={what}"], cwd=tree, env=env, log_path=scratch / "make.log")


def _install(tree: Path, root: Path, started: float) -> None:
    """Copy the binaries next to the final bin dir, then rename it into place in one step."""
    built = tree / "_output" / "bin"
    staging = Path(tempfile.mkdtemp(prefix="bin.tmp-", dir=root))
    for name in BINARIES:
        if not (built / name).is_file():
            raise KubeBuildError(f"make succeeded but {built / name} is missing")
        shutil.copy2(built / name, staging / name)
    go_version = subprocess.run(["go", "version"], capture_output=True, text=True, check=False).stdout.strip()
    stamp = {
        "source_package": SOURCE_PACKAGE,
        "debian_version": DEBIAN_VERSION,
        "upstream_version": UPSTREAM_VERSION,
        "go": go_version,
        "build_seconds": round(time.monotonic() - started),
        "built_at": datetime.now(timezone.utc).isoformat(),
    }
    (staging / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")
    final = root / "bin"
    if final.exists():
        # A leftover from an interrupted install (no stamp, or we would not be here).
        shutil.rmtree(final)
    staging.chmod(0o755)
    staging.rename(final)


def _run(cmd: Sequence[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, check=False)
    for line in result.stdout.splitlines():
        log.debug("%s", line)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-_LOG_TAIL_LINES:])
        raise KubeBuildError(f"{' '.join(cmd)} failed with exit code {result.returncode}:\n{tail}")


def _run_streaming(cmd: Sequence[str], cwd: Path, env: dict[str, str], log_path: Path) -> None:
    """Run a long command, logging each output line at debug level and a heartbeat at info level.

    Go compiles silently for minutes at a time, so the heartbeat comes from a timer rather than
    from output lines.
    """
    tail: collections.deque[str] = collections.deque(maxlen=_LOG_TAIL_LINES)
    started = time.monotonic()
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        assert proc.stdout is not None

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                log_file.write(line + "\n")
                tail.append(line)
                log.debug("make: %s", line)

        reader = threading.Thread(target=pump, name="kubebuild-make-output", daemon=True)
        reader.start()
        try:
            while True:
                try:
                    proc.wait(timeout=_PROGRESS_INTERVAL_S)
                    break
                except subprocess.TimeoutExpired:
                    log.info("still building... %.0f s elapsed", time.monotonic() - started)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        reader.join(timeout=10)
    if proc.returncode != 0:
        raise KubeBuildError(
            f"{' '.join(cmd)} failed with exit code {proc.returncode} (full log: {log_path}):\n" + "\n".join(tail)
        )


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    binaries = ensure_kube_binaries()
    print(f"etcd: {ensure_etcd()}")
    print(f"kube-apiserver: {binaries.apiserver}")
    print(f"kube-controller-manager: {binaries.controller_manager}")


if __name__ == "__main__":
    main()
