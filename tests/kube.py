"""Kubernetes test infrastructure: the local cluster (or TUNELOOM_TEST_KUBECONFIG), the pod runner,
and helpers shared by the cluster, CRD and operator tests."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from tuneloom_dev.cluster import LocalCluster
from tuneloom_dev.kubebuild import ensure_kube_binaries
from tuneloom_dev.podrunner import PodRunner

TIMEOUT_S = 120.0
T = TypeVar("T")


@dataclass
class KubeCluster:
    """The cluster the tests talk to: the local one, or the one TUNELOOM_TEST_KUBECONFIG names."""

    kubeconfig: Path
    local: LocalCluster | None

    def env(self) -> dict[str, str]:
        return {"KUBECONFIG": str(self.kubeconfig)}


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    external = os.environ.get("TUNELOOM_TEST_KUBECONFIG")
    if external:
        yield KubeCluster(kubeconfig=Path(external), local=None)
        return
    ensure_kube_binaries()  # builds once (minutes) into the cache if missing
    with LocalCluster(tmp_path_factory.mktemp("kube")) as cluster:
        yield KubeCluster(kubeconfig=cluster.kubeconfig, local=cluster)


@pytest.fixture(scope="session")
def pod_runner(kube_cluster: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodRunner | None]:
    """Runs the local cluster's Pods; None on an external cluster, whose kubelets do that."""
    if kube_cluster.local is None:
        yield None
        return
    with PodRunner(kube_cluster.kubeconfig, work_dir=tmp_path_factory.mktemp("pods")) as runner:
        yield runner


@pytest.fixture(scope="session")
def api(kube_cluster: KubeCluster) -> Iterator[k8s.ApiClient]:
    api_client = k8s_config.new_client_from_config(config_file=str(kube_cluster.kubeconfig))
    yield api_client
    api_client.close()


@pytest.fixture
def namespace(api: k8s.ApiClient, pod_runner: PodRunner | None) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    core = k8s.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


# -- helpers -------------------------------------------------------------------------------------


def wait_for(check: Callable[[], T | None], what: str, timeout: float = TIMEOUT_S) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.25)


def kubectl(cluster: KubeCluster, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        ["kubectl", "--kubeconfig", str(cluster.kubeconfig), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kubectl {' '.join(args)} failed: {result.stderr}"
    return result.stdout


def install_crds(cluster: KubeCluster, api: k8s.ApiClient, plurals: list[str]) -> None:
    """Applies the repository's CRDs of these kinds and waits until the API server serves them."""
    root = Path(__file__).resolve().parent.parent
    extensions = k8s.ApiextensionsV1Api(api)
    for plural in plurals:
        kubectl(cluster, "apply", "-f", str(root / "crds" / f"{plural}.yaml"))

        def established(plural: str = plural) -> bool:
            crd = extensions.read_custom_resource_definition(f"{plural}.tuneloom.dev")
            return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])

        wait_for(established, f"the {plural} CRD to be established")
