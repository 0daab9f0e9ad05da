"""The local Kubernetes control plane and the pod runner that stands in for kubelet + scheduler.

With `TUNELOOM_TEST_KUBECONFIG` set, the tests run against that cluster instead (one with real
kubelets): checks that only make sense for the local stand-ins are skipped there.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from tuneloom_dev.cluster import COMPONENTS, LocalCluster
from tuneloom_dev.podrunner import PodRunner

from .kube import KubeCluster, kubectl, wait_for

IMAGE = "python:3.11-slim"  # ignored by the pod runner; what a real cluster would pull


def read_pod(core: k8s.CoreV1Api, namespace: str, name: str) -> k8s.V1Pod | None:
    try:
        return core.read_namespaced_pod(name, namespace)
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def pod_container(name: str, command: list[str], **extra: Any) -> dict[str, Any]:
    return {"name": name, "image": IMAGE, "command": command, **extra}


def create_pod(core: k8s.CoreV1Api, namespace: str, name: str, spec: dict[str, Any]) -> None:
    core.create_namespaced_pod(namespace, {"metadata": {"name": name}, "spec": {"restartPolicy": "Never", **spec}})


def wait_running(core: k8s.CoreV1Api, namespace: str, name: str) -> k8s.V1Pod:
    def running() -> k8s.V1Pod | None:
        pod = read_pod(core, namespace, name)
        return pod if pod is not None and pod.status.phase == "Running" and pod.status.pod_ip else None

    return wait_for(running, f"pod {name} running")


def pod_log(core: k8s.CoreV1Api, runner: PodRunner | None, namespace: str, pod: str, container: str) -> str:
    if runner is not None:
        return runner.log_path(namespace, pod, container).read_text()
    return str(core.read_namespaced_pod_log(pod, namespace, container=container))


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def printer(expression: str, *args: str) -> list[str]:
    """A command that prints `expression` (os and sys imported), then stays up for a minute."""
    return ["python", "-c", f"import os, sys, time; print({expression}, flush=True); time.sleep(60)", *args]


def sleeper(seconds: int = 300, ignore_sigterm: bool = False) -> list[str]:
    code = "import signal, time\n"
    if ignore_sigterm:
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += f"time.sleep({seconds})\n"
    return ["python", "-c", code]


# -- the control plane ---------------------------------------------------------------------------


def test_kubectl_lists_namespaces(kube_cluster: KubeCluster) -> None:
    names = kubectl(kube_cluster, "get", "ns", "-o", "name").split()
    assert "namespace/default" in names
    assert "namespace/kube-system" in names


def test_crd_is_established_and_serves_objects(kube_cluster: KubeCluster, api: k8s.ApiClient) -> None:
    group, plural = "tests.tuneloom.dev", f"widgets{uuid.uuid4().hex[:6]}"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": plural[:-1], "kind": plural.capitalize()[:-1]},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {"type": "object", "properties": {"size": {"type": "integer", "minimum": 1}}}
                            },
                        }
                    },
                }
            ],
        },
    }
    extensions = k8s.ApiextensionsV1Api(api)
    extensions.create_custom_resource_definition(crd)
    try:
        kubectl(kube_cluster, "wait", "--for=condition=established", f"crd/{plural}.{group}", "--timeout=60s")
        custom = k8s.CustomObjectsApi(api)
        body = {"apiVersion": f"{group}/v1", "kind": crd["spec"]["names"]["kind"], "metadata": {"name": "w1"}}
        custom.create_namespaced_custom_object(group, "v1", "default", plural, {**body, "spec": {"size": 2}})
        got = custom.get_namespaced_custom_object(group, "v1", "default", plural, "w1")
        assert got["spec"]["size"] == 2
        with pytest.raises(ApiException) as rejected:
            bad = {**body, "metadata": {"name": "w2"}, "spec": {"size": 0}}
            custom.create_namespaced_custom_object(group, "v1", "default", plural, bad)
        assert rejected.value.status == 422
    finally:
        extensions.delete_custom_resource_definition(f"{plural}.{group}")


def test_default_service_account_exists(api: k8s.ApiClient, namespace: str) -> None:
    # The serviceaccount controller is on (only the token controller is off).
    core = k8s.CoreV1Api(api)
    wait_for(lambda: _exists(lambda: core.read_namespaced_service_account("default", namespace)), "default SA")


def _exists(read: Callable[[], Any]) -> bool:
    try:
        read()
    except ApiException as err:
        if err.status == 404:
            return False
        raise
    return True


# -- Jobs and Pods -------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 3])
def test_job_runs_with_env_from_secret_and_configmap(
    api: k8s.ApiClient, pod_runner: PodRunner | None, namespace: str, code: int
) -> None:
    core, batch = k8s.CoreV1Api(api), k8s.BatchV1Api(api)
    core.create_namespaced_secret(namespace, {"metadata": {"name": "greeting"}, "stringData": {"text": "hello, job"}})
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "settings"}, "data": {"code": str(code)}})
    script = "import os, sys; print(os.environ['GREETING']); sys.exit(int(os.environ['CODE']))"
    env = [
        {"name": "GREETING", "valueFrom": {"secretKeyRef": {"name": "greeting", "key": "text"}}},
        {"name": "CODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "code"}}},
    ]
    job = {
        "metadata": {"name": "greeter"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [pod_container("main", ["python", "-c", script], env=env)],
                }
            },
        },
    }
    batch.create_namespaced_job(namespace, job)
    expected = "Complete" if code == 0 else "Failed"

    def finished() -> str | None:
        conditions = batch.read_namespaced_job_status("greeter", namespace).status.conditions or []
        done = [c.type for c in conditions if c.status == "True" and c.type in ("Complete", "Failed")]
        return done[0] if done else None

    assert wait_for(finished, "the Job to finish") == expected
    pods = core.list_namespaced_pod(namespace, label_selector="job-name=greeter").items
    assert len(pods) == 1
    pod = pods[0]
    terminated = pod.status.container_statuses[0].state.terminated
    assert terminated.exit_code == code
    assert terminated.reason == ("Completed" if code == 0 else "Error")
    assert pod.status.phase == ("Succeeded" if code == 0 else "Failed")
    assert "hello, job" in pod_log(core, pod_runner, namespace, pod.metadata.name, "main")


def test_configmap_volume_is_mounted_and_paths_are_mapped(
    api: k8s.ApiClient, pod_runner: PodRunner | None, namespace: str
) -> None:
    core = k8s.CoreV1Api(api)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "job"}, "data": {"job.yaml": "steps: 7\n"}})
    script = "import os; print(open(os.environ['JOB_FILE']).read().strip()); print(open('/etc/x/job.yaml').read())"
    if pod_runner is not None:
        # Literal paths in code are not mapped (only env values and arguments are): read via the root.
        script = script.replace("'/etc/x/job.yaml'", "os.environ['TUNELOOM_POD_ROOT'] + '/etc/x/job.yaml'")
    container = pod_container(
        "main",
        ["python", "-c", script],
        env=[{"name": "JOB_FILE", "value": "/etc/x/job.yaml"}],
        volumeMounts=[{"name": "config", "mountPath": "/etc/x"}],
    )
    spec = {"containers": [container], "volumes": [{"name": "config", "configMap": {"name": "job"}}]}
    create_pod(core, namespace, "reader", spec)

    def done() -> str | None:
        pod = read_pod(core, namespace, "reader")
        return pod.status.phase if pod and pod.status.phase in ("Succeeded", "Failed") else None

    assert wait_for(done, "the reader pod to finish") == "Succeeded"
    assert pod_log(core, pod_runner, namespace, "reader", "main").count("steps: 7") == 2


def test_pods_get_distinct_ips(api: k8s.ApiClient, pod_runner: PodRunner | None, namespace: str) -> None:
    core = k8s.CoreV1Api(api)
    for name in ("a", "b"):
        create_pod(core, namespace, name, {"containers": [pod_container("main", sleeper(60))]})
    ips = {wait_running(core, namespace, name).status.pod_ip for name in ("a", "b")}
    assert len(ips) == 2


def test_pods_are_told_to_bind_to_their_own_address(
    api: k8s.ApiClient, pod_runner: PodRunner | None, namespace: str
) -> None:
    if pod_runner is None:
        pytest.skip("the pod runner's stand-in for a Pod's own network; real Pods have one")
    core = k8s.CoreV1Api(api)
    create_pod(
        core,
        namespace,
        "binder",
        {"containers": [pod_container("main", printer("os.environ['TUNELOOM_BIND_ADDRESS']"))]},
    )
    ip = wait_running(core, namespace, "binder").status.pod_ip
    wait_for(lambda: pod_log(core, pod_runner, namespace, "binder", "main").strip() == ip, "the bind address")


def test_a_pod_dns_name_in_a_command_becomes_that_pods_address(
    api: k8s.ApiClient, pod_runner: PodRunner | None, namespace: str
) -> None:
    """The runner's stand-in for a headless Service's pod names: the caller waits for the named pod."""
    if pod_runner is None:
        pytest.skip("the pod runner's stand-in for cluster DNS; real Pods have DNS")
    caller = pod_container("main", printer("sys.argv[1]", f"--peer=host-0.group.{namespace}.svc:29400"))
    core = k8s.CoreV1Api(api)
    create_pod(core, namespace, "caller", {"containers": [caller]})

    def waiting() -> str | None:
        statuses = read_pod(core, namespace, "caller").status.container_statuses or []
        return next((s.state.waiting.message for s in statuses if s.state.waiting), None)

    assert wait_for(waiting, "the caller to wait") == f"pod host-0.group.{namespace}.svc has no address yet"
    named = {"hostname": "host-0", "subdomain": "group", "containers": [pod_container("main", sleeper(60))]}
    create_pod(core, namespace, "named", named)
    ip = wait_running(core, namespace, "named").status.pod_ip
    wait_running(core, namespace, "caller")
    wait_for(
        lambda: pod_log(core, pod_runner, namespace, "caller", "main").strip() == f"--peer={ip}:29400", "the address"
    )


def test_a_pod_acts_as_its_service_account(api: k8s.ApiClient, pod_runner: PodRunner | None, namespace: str) -> None:
    """As the kubelet mounts a ServiceAccount token: a Pod has its account's RBAC and no more, and
    a Pod that opts out of the token has no credentials at all."""
    if pod_runner is None:
        pytest.skip("the pod runner's stand-in for the kubelet's token; real Pods mount one")
    core, rbac = k8s.CoreV1Api(api), k8s.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "shared"}, "data": {"word": "visible"}})
    rule = {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}
    rbac.create_namespaced_role(namespace, {"metadata": {"name": "reader"}, "rules": [rule]})
    binding = {
        "metadata": {"name": "reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
    }
    rbac.create_namespaced_role_binding(namespace, binding)
    script = (
        "import os\n"
        "from kubernetes import client, config\n"
        "if 'KUBECONFIG' not in os.environ:\n"
        "    print('no credentials', flush=True); raise SystemExit\n"
        "config.load_kube_config(); core = client.CoreV1Api()\n"
        f"word = core.read_namespaced_config_map('shared', '{namespace}').data['word']\n"
        "try:\n"
        f"    core.list_namespaced_secret('{namespace}'); secrets = 'listed'\n"
        "except client.ApiException as error:\n"
        "    secrets = error.status\n"
        "print(word, secrets, flush=True)\n"
    )
    reader = {"serviceAccountName": "reader", "containers": [pod_container("main", ["python", "-c", script])]}
    create_pod(core, namespace, "as-reader", reader)
    opted_out = {"automountServiceAccountToken": False, "containers": [pod_container("main", ["python", "-c", script])]}
    create_pod(core, namespace, "no-token", opted_out)
    for pod, printed in (("as-reader", "visible 403"), ("no-token", "no credentials")):
        wait_for(lambda pod=pod: read_pod(core, namespace, pod).status.phase in ("Succeeded", "Failed"), f"pod {pod}")
        assert pod_log(core, pod_runner, namespace, pod, "main").strip() == printed


def test_only_its_own_address_is_local_to_a_pod(
    api: k8s.ApiClient, pod_runner: PodRunner | None, namespace: str
) -> None:
    """torchrun's agent hosts the c10d rendezvous store where the endpoint is its own address: on
    the runner, whose Pods all have loopback addresses, only the Pod's own one may count."""
    if pod_runner is None:
        pytest.skip("the pod runner's stand-in for a Pod's own address; real Pods have one")
    script = (
        "import os\n"
        "from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend as backend\n"
        "own, other = os.environ['TUNELOOM_POD_IP'], '127.0.0.254'\n"
        "print(backend._matches_machine_hostname(own), backend._matches_machine_hostname(other), flush=True)\n"
    )
    core = k8s.CoreV1Api(api)
    create_pod(core, namespace, "rank-0", {"containers": [pod_container("main", ["python", "-c", script])]})
    wait_for(lambda: read_pod(core, namespace, "rank-0").status.phase in ("Succeeded", "Failed"), "pod rank-0")
    assert pod_log(core, pod_runner, namespace, "rank-0", "main").strip() == "True False"


def test_a_service_name_reaches_a_ready_pod_behind_it(
    api: k8s.ApiClient, pod_runner: PodRunner | None, namespace: str
) -> None:
    """The runner's stand-in for cluster DNS for Services, as tuneloom's API reaches a ModelServer."""
    if pod_runner is None:
        pytest.skip("the pod runner's stand-in for cluster DNS; real Pods have DNS")
    serve = (
        "import http.server, os; http.server.HTTPServer((os.environ['TUNELOOM_POD_IP'], 8080), "
        "http.server.SimpleHTTPRequestHandler).serve_forever()"
    )
    server = pod_container(
        "server",
        ["python", "-c", serve],
        ports=[{"name": "http", "containerPort": 8080}],
        readinessProbe={"tcpSocket": {"port": "http"}, "periodSeconds": 1},
    )
    pod = {"metadata": {"name": "web", "labels": {"app": "web"}}, "spec": {"containers": [server]}}
    core = k8s.CoreV1Api(api)
    core.create_namespaced_pod(namespace, pod)
    service = {"selector": {"app": "web"}, "ports": [{"port": 8080, "targetPort": "http"}]}
    core.create_namespaced_service(namespace, {"metadata": {"name": "web"}, "spec": service})
    # Until the Pod is ready the name does not resolve; the caller retries, as a client would.
    ask = (
        "import socket, time, urllib.request\n"
        "while True:\n"
        "    try:\n"
        f"        status = urllib.request.urlopen('http://web.{namespace}.svc.cluster.local:8080/').status\n"
        "        break\n"
        "    except OSError:\n"
        "        time.sleep(0.5)\n"
        "async def on_uvloop():\n"
        "    import asyncio\n"
        f"    return (await asyncio.get_running_loop().getaddrinfo('web.{namespace}.svc', 8080))[0][4][0]\n"
        "import uvloop\n"
        f"resolved = socket.getaddrinfo('web.{namespace}.svc', 8080)[0][4][0]\n"
        "print(resolved, uvloop.run(on_uvloop()), status, flush=True)\n"
        "time.sleep(60)\n"
    )
    create_pod(core, namespace, "caller", {"containers": [pod_container("main", ["python", "-c", ask])]})
    ip = wait_running(core, namespace, "web").status.pod_ip
    wait_for(lambda: pod_log(core, pod_runner, namespace, "caller", "main").strip() == f"{ip} {ip} 200", "the answer")


def test_readiness_probe_gates_ready(api: k8s.ApiClient, pod_runner: PodRunner | None, namespace: str) -> None:
    core = k8s.CoreV1Api(api)
    # Waits 3 s before serving, so the Pod is first Running but not Ready.
    script = (
        "import http.server, os, time; time.sleep(3); "
        "http.server.HTTPServer((os.environ['POD_IP'], 8080), http.server.SimpleHTTPRequestHandler).serve_forever()"
    )
    container = pod_container(
        "server",
        ["python", "-c", script],
        env=[{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        ports=[{"name": "http", "containerPort": 8080}],
        readinessProbe={"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
    )
    create_pod(core, namespace, "server", {"containers": [container]})
    pod = wait_running(core, namespace, "server")
    assert not pod.status.container_statuses[0].ready

    def ready() -> bool:
        current = read_pod(core, namespace, "server")
        conditions = {c.type: c.status for c in (current.status.conditions or [])} if current else {}
        return conditions.get("Ready") == "True"

    wait_for(ready, "the server pod to become Ready", timeout=60)


def test_deleting_a_running_pod_kills_its_process(
    api: k8s.ApiClient, pod_runner: PodRunner | None, namespace: str
) -> None:
    core = k8s.CoreV1Api(api)
    # Ignores SIGTERM, so only the SIGKILL after the grace period ends it.
    spec = {"terminationGracePeriodSeconds": 2, "containers": [pod_container("main", sleeper(300, True))]}
    create_pod(core, namespace, "sleeper", spec)
    wait_running(core, namespace, "sleeper")
    pid = wait_for(lambda: pod_runner.pids(namespace, "sleeper") if pod_runner else {"main": 0}, "pid")["main"]
    core.delete_namespaced_pod("sleeper", namespace)
    wait_for(lambda: read_pod(core, namespace, "sleeper") is None, "the pod to be deleted", timeout=60)
    if pod_runner is not None:
        assert not process_alive(pid)


@pytest.mark.parametrize("policy", ["Foreground", "Background"])
def test_deleting_a_job_garbage_collects_its_pods(
    api: k8s.ApiClient, pod_runner: PodRunner | None, namespace: str, policy: str
) -> None:
    core, batch = k8s.CoreV1Api(api), k8s.BatchV1Api(api)
    job = {
        "metadata": {"name": "long"},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": {"restartPolicy": "Never", "containers": [pod_container("main", sleeper())]}},
        },
    }
    batch.create_namespaced_job(namespace, job)

    def job_pod() -> str | None:
        pods = core.list_namespaced_pod(namespace, label_selector="job-name=long").items
        return pods[0].metadata.name if pods and pods[0].status.phase == "Running" else None

    pod_name = wait_for(job_pod, "the Job's pod to run")
    pid = wait_for(lambda: pod_runner.pids(namespace, pod_name) if pod_runner else {"main": 0}, "pid")["main"]
    batch.delete_namespaced_job("long", namespace, body={"propagationPolicy": policy})

    def all_gone() -> bool:
        pods = core.list_namespaced_pod(namespace, label_selector="job-name=long").items
        jobs = batch.list_namespaced_job(namespace).items
        return not pods and not jobs

    wait_for(all_gone, f"{policy} deletion of the Job and its pods")
    if pod_runner is not None:
        assert not process_alive(pid)


# -- lifecycle of the local cluster --------------------------------------------------------------


def test_up_reuses_and_down_stops_every_process(kube_cluster: KubeCluster, tmp_path: Path) -> None:
    if kube_cluster.local is None:
        pytest.skip("checks the local cluster's processes; an external cluster is in use")
    state = tmp_path / "cluster"
    first = LocalCluster(state).up()
    pids = first.running_pids()
    assert set(pids) == set(COMPONENTS)
    try:
        # A second handle on the same state dir adopts the running cluster instead of starting one.
        second = LocalCluster(state).up()
        assert second.running_pids() == pids
        assert second.env() == {"KUBECONFIG": str(state / "kubeconfig")}
        assert "namespace/default" in kubectl(KubeCluster(second.kubeconfig, second), "get", "ns", "-o", "name")
    finally:
        LocalCluster(state).down()
    assert not any(process_alive(pid) for pid in pids.values())
    assert first.running_pids() == {}
