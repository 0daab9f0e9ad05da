"""Test infrastructure: a stand-in for the scheduler and the kubelet of the local cluster.

The local control plane (`tuneloom_dev.cluster`) has no scheduler and no kubelet, so Pods would
stay Pending forever. `PodRunner` registers one Node, binds every unscheduled Pod to it and runs
each container's `command` + `args` as a local process, reporting status the way a kubelet does,
so the real controllers (Job, ReplicaSet, garbage collector) and tuneloom's operator see Pods
start, become Ready, succeed and fail.

It is not a container runtime. What differs, and the rules that bridge it:

- The image is ignored: the command runs on this machine as given. A leading `python`,
  `python3` or `python3.N` becomes `sys.executable`, and the runner's interpreter directory is
  first on PATH, so the project's own entry points (`python -m tuneloom.trainer`, `tuneloom`)
  run from the same virtual environment. A container without a command cannot run (there is no
  image entrypoint to fall back on) and fails with reason "NoCommand".
- The file system is the host's. Each Pod gets a root directory, `<work_dir>/<ns>/<pod>/`
  (exported as TUNELOOM_POD_ROOT). Volumes (configMap, secret, downwardAPI, projected, emptyDir,
  persistentVolumeClaim as a directory kept under `<work_dir>/.pvc/`, hostPath as the host path)
  are materialised under `<pod root>/.volumes/` and each volumeMount becomes a symlink at
  `<pod root>/<mountPath>`. Path rule: every env value and every command/args element that
  equals a mountPath or starts with `<mountPath>/` (also the value part of `--flag=<path>`) is
  prefixed with the pod root, so `/etc/tuneloom/job.yaml` becomes
  `<pod root>/etc/tuneloom/job.yaml`. `workingDir` likewise becomes `<pod root>/<workingDir>`
  (created if missing); without one the process runs in the pod root.
- Networking: each Pod gets its own loopback address (127.0.0.2, .3, ..., reused after the Pod
  ends), reported as status.podIP and exported as TUNELOOM_POD_IP. Servers must bind to that
  address (not 0.0.0.0) for two Pods to use the same port: the runner also exports it as
  TUNELOOM_BIND_ADDRESS, where tuneloom's servers listen unless told otherwise (a Pod's own env
  or `--host` wins, so tests point the operator and ModelServer pods at "$(TUNELOOM_POD_IP)").
- The environment is the Pod's own (envFrom, then env, with `$(VAR)` expansion) over a small
  base: PATH, HOME, LANG, TMPDIR, TUNELOOM_CACHE_DIR from the runner, KUBECONFIG pointing at a
  kubeconfig with a token of the Pod's ServiceAccount (so a Pod has exactly its account's RBAC,
  as on a cluster; none for `automountServiceAccountToken: false`), and `extra_env`.
- DNS: a Pod with `hostname` and `subdomain` (a headless Service's pods, an Indexed Job's) is
  reachable as `<hostname>.<subdomain>.<namespace>.svc[.cluster.local]`, but only through the
  command and args: an element that holds such a name (`--rdzv-endpoint=NAME:PORT`) gets that
  Pod's address instead. A Pod whose command names one the runner does not run yet waits, as
  CreateContainerConfigError, until it does. A Service's name, `<service>.<namespace>.svc
  [.cluster.local]`, resolves in the Pods' Python processes (`socket.getaddrinfo` and uvloop's
  loop) to a ready Pod the Service selects, for Services whose port is their target port
  (`tuneloom_dev.servicedns`, loaded by the `sitecustomize` that the runner puts on PYTHONPATH;
  `python -I` skips it). Of the loopback addresses, only the Pod's own is local to it where
  torchrun asks whether it hosts the c10d rendezvous (`tuneloom_dev.podaddress`, loaded so too),
  so rank 0's agent hosts the store, as on a cluster.
- Liveness and startup probes are ignored; readiness probes (httpGet, tcpSocket, exec) are run.
  Node selectors, affinity, taints and resource requests are not checked: every Pod binds.
- One runner per node name: a Running Pod on its node that it did not start (say, after a
  restart) is marked Failed, as its process is gone.
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import ctypes.util
import functools
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from contextlib import closing, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.utils import parse_quantity
from kubernetes.watch.watch import iter_resp_lines

from tuneloom_dev.cluster import service_account_kubeconfig
from tuneloom_dev.servicedns import DNS_KUBECONFIG_ENV

log = logging.getLogger("tuneloom_dev.podrunner")

DEFAULT_NODE_NAME = "tuneloom-local"
HOST_IP = "127.0.0.1"
DEFAULT_CAPACITY = {"pods": "110", "nvidia.com/gpu": "8", "ephemeral-storage": "100Gi"}
# Environment variables passed from the runner to every Pod (a container image would set them).
BASE_ENV_NAMES = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "TUNELOOM_CACHE_DIR")
# Its sitecustomize resolves Service names in each Pod's Python processes (the module doc's DNS rule).
POD_SITE = Path(__file__).resolve().parent / "podsite"

_HEARTBEAT_S = 10.0
_TICK_S = 0.2
_WATCH_TIMEOUT_S = 20
_API_TIMEOUT_S = 15
_CONFIG_RETRY_S = 1.0
_RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 20.0)
_SHUTDOWN_GRACE_S = 5.0
_MESSAGE_LINES = 10
_MESSAGE_BYTES = 2048
_MERGE_PATCH = "application/merge-patch+json"
_PYTHON = re.compile(r"python(3(\.\d+)?)?")
_ENV_REF = re.compile(r"\$\$|\$\(([^)]*)\)")
# A Pod's DNS name, <hostname>.<subdomain>.<namespace>.svc: one label more than a Service's.
_POD_DNS = re.compile(r"\b([a-z0-9-]+\.[a-z0-9-]+\.[a-z0-9-]+)\.svc(?:\.cluster\.local)?\b")


_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it when the thread that started it dies, so a
    crashed or killed runner (say, pytest killed by a timeout) leaves no Pod processes behind."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class _ConfigMissing(Exception):
    """A ConfigMap or Secret a container needs does not exist (yet); the kubelet retries."""


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the runner ----------------------------------------------------------------------------------


class PodRunner:
    """Registers a Node and runs the Pods bound to it as local processes (see the module doc)."""

    def __init__(
        self,
        kubeconfig: Path | str,
        node_name: str = DEFAULT_NODE_NAME,
        work_dir: Path | str | None = None,
        address_pool: str = "127.0.0.",
        capacity: Mapping[str, str] | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.kubeconfig = Path(kubeconfig).resolve()
        self.node_name = node_name
        self.work_dir = Path(work_dir).resolve() if work_dir else self.kubeconfig.parent / "pods"
        self.extra_env = dict(extra_env or {})
        self._capacity = {**_host_capacity(), **DEFAULT_CAPACITY, **(capacity or {})}
        self._addresses = _AddressPool(address_pool)
        self._api = k8s_config.new_client_from_config(config_file=str(self.kubeconfig))
        self.core = k8s.CoreV1Api(self._api)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: dict[str, _PodWorker] = {}
        self._finished: set[str] = set()
        self._pod_dns: dict[str, str] = {}  # "<hostname>.<subdomain>.<namespace>" -> address
        self._threads: list[threading.Thread] = []
        self._watch_response: Any = None
        self._registered_at = _now()

    # -- public API --------------------------------------------------------------------------

    def start(self) -> PodRunner:
        """Register the Node and start watching Pods in background threads."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._register_node()
        for target, name in ((self._watch_loop, "watch"), (self._heartbeat_loop, "heartbeat")):
            thread = threading.Thread(target=target, name=f"podrunner-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        # A script that ends without calling stop() must not leave Pod processes running.
        atexit.register(self.stop)
        log.info("pod runner started: node %s, pods under %s", self.node_name, self.work_dir)
        return self

    def stop(self) -> None:
        """Kill every Pod process (their Pods are marked Failed) and stop the background threads."""
        atexit.unregister(self.stop)
        if self._stop.is_set():
            return
        self._stop.set()
        response = self._watch_response
        if response is not None:
            with suppress(Exception):
                response.close()
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.shutdown()
        for worker in workers:
            worker.join(timeout=60)
        for thread in self._threads:
            thread.join(timeout=_WATCH_TIMEOUT_S + 5)
        self._threads.clear()
        self._api.close()

    def pod_dir(self, namespace: str, pod: str) -> Path:
        """The Pod's root: its logs, volumes and mount points."""
        return self.work_dir / namespace / pod

    def log_path(self, namespace: str, pod: str, container: str) -> Path:
        """Where the container's stdout and stderr go (appended to across restarts)."""
        return self.pod_dir(namespace, pod) / f"{container}.log"

    def pids(self, namespace: str, pod: str) -> dict[str, int]:
        """The live process ids of a Pod's containers, by container name."""
        with self._lock:
            workers = [w for w in self._workers.values() if (w.namespace, w.name) == (namespace, pod)]
        return {name: pid for w in workers for name, pid in w.pids().items()}

    def __enter__(self) -> PodRunner:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- node --------------------------------------------------------------------------------

    def _register_node(self) -> None:
        labels = {
            "kubernetes.io/hostname": self.node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "tuneloom.dev/pod-runner": "true",
        }
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node_name, "labels": labels}}
        try:
            self.core.create_node(body, _request_timeout=_API_TIMEOUT_S)
        except ApiException as err:
            if err.status != 409:
                raise
            patch = {"metadata": {"labels": labels}}
            self.core.patch_node(self.node_name, patch, _content_type=_MERGE_PATCH, _request_timeout=_API_TIMEOUT_S)
        self._patch_node_status(full=True)

    def _patch_node_status(self, full: bool) -> None:
        now, since = _now(), self._registered_at
        conditions = [
            _node_condition("Ready", "True", "KubeletReady", "tuneloom pod runner is posting ready status", now, since),
            _node_condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "", now, since),
            _node_condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "", now, since),
            _node_condition("PIDPressure", "False", "KubeletHasSufficientPID", "", now, since),
        ]
        status: dict[str, Any] = {"conditions": conditions}
        if full:
            status.update(
                capacity=self._capacity,
                allocatable=self._capacity,
                addresses=[{"type": "InternalIP", "address": HOST_IP}, {"type": "Hostname", "address": self.node_name}],
                daemonEndpoints={"kubeletEndpoint": {"Port": 0}},
                nodeInfo=_node_info(),
            )
        self.core.patch_node_status(
            self.node_name, {"status": status}, _content_type=_MERGE_PATCH, _request_timeout=_API_TIMEOUT_S
        )

    def _heartbeat_loop(self) -> None:
        # The node lifecycle controller marks the Node NotReady (and then evicts its Pods) when
        # the Ready condition's heartbeat is older than 40 s.
        while not self._stop.wait(_HEARTBEAT_S):
            try:
                self._patch_node_status(full=False)
            except Exception as err:  # the API server may be restarting; keep trying
                log.warning("node heartbeat failed: %s", err)

    # -- watching ----------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        resource_version: str | None = None
        while not self._stop.is_set():
            try:
                if resource_version is None:
                    resource_version = self._list_pods()
                resource_version = self._watch_pods(resource_version)
            except _WatchExpired:
                resource_version = None
            except Exception as err:
                if self._stop.is_set():
                    break
                log.warning("pod watch failed (%s); listing again", err)
                resource_version = None
                self._stop.wait(1.0)

    def _list_pods(self) -> str:
        response = self.core.list_pod_for_all_namespaces(_preload_content=False, _request_timeout=_API_TIMEOUT_S)
        listing = json.loads(response.data)
        for pod in listing.get("items", []):
            self._on_pod("MODIFIED", pod)
        return str(listing["metadata"]["resourceVersion"])

    def _watch_pods(self, resource_version: str) -> str:
        response = self.core.list_pod_for_all_namespaces(
            watch=True,
            resource_version=resource_version,
            timeout_seconds=_WATCH_TIMEOUT_S,
            allow_watch_bookmarks=True,
            _preload_content=False,
            _request_timeout=(_API_TIMEOUT_S, _WATCH_TIMEOUT_S + 10),
        )
        self._watch_response = response
        try:
            for line in iter_resp_lines(response):
                if self._stop.is_set():
                    break
                if not line:
                    continue
                event = json.loads(line)
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":
                    if obj.get("code") == 410:
                        raise _WatchExpired
                    raise RuntimeError(f"watch error: {obj.get('message')}")
                resource_version = obj.get("metadata", {}).get("resourceVersion", resource_version)
                if event.get("type") != "BOOKMARK":
                    self._on_pod(event["type"], obj)
        finally:
            self._watch_response = None
            response.close()
            response.release_conn()
        return resource_version

    def _on_pod(self, event_type: str, pod: dict[str, Any]) -> None:
        meta = pod.get("metadata", {})
        uid = meta.get("uid", "")
        node = pod.get("spec", {}).get("nodeName") or ""
        if node not in ("", self.node_name):
            return
        with self._lock:
            worker = self._workers.get(uid)
            if worker is not None:
                if event_type == "DELETED":
                    worker.gone()
                else:
                    worker.update(pod)
                return
            if event_type == "DELETED" or uid in self._finished or self._stop.is_set():
                return
            phase = pod.get("status", {}).get("phase")
            if phase in ("Succeeded", "Failed"):
                return
            if node and (meta.get("deletionTimestamp") or phase == "Running"):
                # Ours, but not started by this runner: its process (if any) is gone.
                self._finished.add(uid)
                threading.Thread(target=self._settle_orphan, args=(pod,), daemon=True).start()
                return
            worker = _PodWorker(self, pod)
            self._workers[uid] = worker
        worker.start()

    def _settle_orphan(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        try:
            if meta.get("deletionTimestamp"):
                self._force_delete(meta["namespace"], meta["name"], meta["uid"])
            else:
                log.warning("pod %s/%s was running before this runner started; marking it Failed", *_ref(pod))
                status = _lost_status(pod)
                self.core.patch_namespaced_pod_status(
                    meta["name"], meta["namespace"], {"status": status}, _content_type=_MERGE_PATCH
                )
        except ApiException as err:
            if err.status != 404:
                log.warning("could not settle pod %s/%s: %s", *_ref(pod), err)

    def _force_delete(self, namespace: str, name: str, uid: str) -> None:
        """Finish a graceful deletion, as the kubelet does once the containers are gone."""
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
        try:
            self.core.delete_namespaced_pod(name, namespace, body=body, grace_period_seconds=0, _request_timeout=15)
        except ApiException as err:
            if err.status not in (404, 409):
                raise

    def _worker_done(self, worker: _PodWorker) -> None:
        with self._lock:
            self._workers.pop(worker.uid, None)
            self._finished.add(worker.uid)
            if self._pod_dns.get(worker.dns_name) == worker.ip:
                del self._pod_dns[worker.dns_name]

    def _register_dns(self, name: str, address: str) -> None:
        with self._lock:
            self._pod_dns[name] = address

    def _address_of(self, name: str) -> str | None:
        with self._lock:
            return self._pod_dns.get(name)


class _WatchExpired(Exception):
    """The watch's resourceVersion is too old (HTTP 410): list again."""


class _AddressPool:
    """Loopback addresses for Pods: every 127.0.0.0/8 address reaches `lo` on Linux unconfigured."""

    def __init__(self, prefix: str) -> None:
        self._free = [f"{prefix}{n}" for n in range(2, 255)]
        self._lock = threading.Lock()

    def acquire(self) -> str:
        with self._lock:
            if not self._free:
                raise RuntimeError("no free pod address left")
            return self._free.pop(0)

    def release(self, address: str) -> None:
        with self._lock:
            # Back of the queue: a just-ended Pod's address is reused last, so a client still
            # holding it does not reach a new Pod by surprise.
            self._free.append(address)


# -- one Pod -------------------------------------------------------------------------------------


@dataclass
class _Container:
    spec: dict[str, Any]
    init: bool
    proc: subprocess.Popen[bytes] | None = None
    started_at: str | None = None
    restarts: int = 0
    terminated: dict[str, Any] | None = None
    last_terminated: dict[str, Any] | None = None
    restart_at: float | None = None
    waiting: tuple[str, str] | None = ("ContainerCreating", "")
    ready: bool = False
    probe_due: float = 0.0
    probe_successes: int = 0
    probe_failures: int = 0
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class _PodWorker:
    """Runs one Pod, in its own thread, from binding to its end (or deletion) and reports its status."""

    def __init__(self, runner: PodRunner, pod: dict[str, Any]) -> None:
        self.runner = runner
        self.pod = pod
        meta = pod["metadata"]
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self._thread = threading.Thread(target=self.run, name=f"pod-{self.namespace}-{self.name}", daemon=True)
        self.root = runner.pod_dir(self.namespace, self.name)
        self.ip: str | None = None
        self.start_time: str | None = None
        self.containers: list[_Container] = []
        self._deleting = threading.Event()
        self._gone = threading.Event()
        self._shutdown = threading.Event()
        self._conditions: dict[str, tuple[str, str]] = {}
        self._last_status: dict[str, Any] | None = None
        self._reason: tuple[str, str] | None = None

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # Called from the watch thread.
    def update(self, pod: dict[str, Any]) -> None:
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self._deleting.set()

    def gone(self) -> None:
        self._gone.set()
        self._deleting.set()

    def shutdown(self) -> None:
        self._shutdown.set()

    def pids(self) -> dict[str, int]:
        return {c.name: c.proc.pid for c in self.containers if c.proc is not None and c.running}

    @property
    def _stopping(self) -> bool:
        return self._deleting.is_set() or self._shutdown.is_set()

    # -- lifecycle ---------------------------------------------------------------------------

    def run(self) -> None:
        try:
            if self._bind():
                self._run_pod()
        except Exception:
            log.exception("pod %s/%s: runner error", self.namespace, self.name)
            self._kill_all(grace=0)
            with suppress(Exception):
                self._reason = ("RunnerError", "the tuneloom pod runner failed; see its log")
                self._report("Failed")
        finally:
            if self.ip is not None:
                self.runner._addresses.release(self.ip)
            self.runner._worker_done(self)

    def _bind(self) -> bool:
        if self.pod["spec"].get("nodeName"):
            return True
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.runner.node_name},
        }
        try:
            # _preload_content=False: the reply is a Status, which the client cannot read as a Binding.
            self.runner.core.create_namespaced_pod_binding(
                self.name, self.namespace, body, _preload_content=False, _request_timeout=_API_TIMEOUT_S
            )
        except ApiException as err:
            if err.status in (404, 409):  # deleted meanwhile, or bound by someone else
                log.info("pod %s/%s not bound here: %s", self.namespace, self.name, err.reason)
                return False
            raise
        log.info("bound pod %s/%s to %s", self.namespace, self.name, self.runner.node_name)
        return True

    @property
    def dns_name(self) -> str:
        spec = self.pod["spec"]
        if not (spec.get("hostname") and spec.get("subdomain")):
            return ""
        return f"{spec['hostname']}.{spec['subdomain']}.{self.namespace}"

    def _run_pod(self) -> None:
        self.ip = self.runner._addresses.acquire()
        if self.dns_name:
            self.runner._register_dns(self.dns_name, self.ip)
        self.start_time = _now()
        spec = self.pod["spec"]
        self.containers = [_Container(c, init=True) for c in spec.get("initContainers") or []]
        self.containers += [_Container(c, init=False) for c in spec.get("containers") or []]
        self._report("Pending")
        if not self._prepare():
            self._finish_stopping()
            return
        phase = self._run_init_containers()
        if phase is None:
            phase = self._run_main_containers()
        if phase is None:
            self._finish_stopping()
            return
        self._report(phase)
        log.info("pod %s/%s %s", self.namespace, self.name, phase)

    def _finish_stopping(self) -> None:
        """Deleted or runner stopping: kill the processes, then finish the deletion or mark Failed."""
        grace = self._grace_seconds()
        if self._shutdown.is_set() and not self._deleting.is_set():
            grace = min(grace, _SHUTDOWN_GRACE_S)
        self._kill_all(grace)
        if self._deleting.is_set():
            if not self._gone.is_set():
                self.runner._force_delete(self.namespace, self.name, self.uid)
            log.info("pod %s/%s deleted", self.namespace, self.name)
        else:
            self._reason = ("Shutdown", "the tuneloom pod runner stopped")
            with suppress(Exception):
                self._report("Failed")

    def _grace_seconds(self) -> float:
        meta_grace = self.pod["metadata"].get("deletionGracePeriodSeconds")
        if meta_grace is not None:
            return float(meta_grace)
        return float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))

    # -- preparing: volumes and environment --------------------------------------------------

    def _prepare(self) -> bool:
        """Materialise volumes and resolve each container's command and env; retry while a
        referenced ConfigMap or Secret is missing (the kubelet's CreateContainerConfigError)."""
        while not self._stopping:
            try:
                self._materialise()
                return True
            except _ConfigMissing as err:
                for container in self.containers:
                    container.waiting = ("CreateContainerConfigError", str(err))
                self._report("Pending")
                time.sleep(_CONFIG_RETRY_S)
        return False

    def _materialise(self) -> None:
        if self.root.exists():
            shutil.rmtree(self.root)  # a previous Pod of the same name
        self.root.mkdir(parents=True)
        volumes = {v["name"]: self._volume(v) for v in self.pod["spec"].get("volumes") or []}
        mounts: set[str] = set()
        for container in self.containers:
            for mount in container.spec.get("volumeMounts") or []:
                mounts.add(self._mount(volumes, mount))
        mapper = _PathMapper(self.root, mounts)
        for container in self.containers:
            self._resolve(container, mapper)

    def _volume(self, volume: dict[str, Any]) -> Path:
        target = self.root / ".volumes" / volume["name"]
        if "hostPath" in volume:
            host = Path(volume["hostPath"]["path"])
            if volume["hostPath"].get("type") in ("DirectoryOrCreate", None, ""):
                host.mkdir(parents=True, exist_ok=True)
            return host
        if "persistentVolumeClaim" in volume:
            claim = self.runner.work_dir / ".pvc" / self.namespace / volume["persistentVolumeClaim"]["claimName"]
            claim.mkdir(parents=True, exist_ok=True)
            return claim
        target.mkdir(parents=True)
        if "configMap" in volume:
            self._write_items(target, self._config_map_source(volume["configMap"]))
        elif "secret" in volume:
            source = {**volume["secret"], "name": volume["secret"].get("secretName")}
            self._write_items(target, self._secret_source(source))
        elif "downwardAPI" in volume:
            self._write_items(target, self._downward_source(volume["downwardAPI"]))
        elif "projected" in volume:
            for source in volume["projected"].get("sources") or []:
                if "configMap" in source:
                    self._write_items(target, self._config_map_source(source["configMap"]))
                elif "secret" in source:
                    self._write_items(target, self._secret_source(source["secret"]))
                elif "downwardAPI" in source:
                    self._write_items(target, self._downward_source(source["downwardAPI"]))
        elif "emptyDir" not in volume:
            log.warning("pod %s/%s: volume %s of an unsupported kind is an empty dir", *_ref(self.pod), volume["name"])
        return target

    def _config_map_source(self, source: dict[str, Any]) -> dict[str, bytes]:
        data = self._read_config_map(source["name"], bool(source.get("optional")))
        return _select_items(data, source.get("items"), source.get("optional"))

    def _secret_source(self, source: dict[str, Any]) -> dict[str, bytes]:
        data = self._read_secret(source["name"], bool(source.get("optional")))
        return _select_items(data, source.get("items"), source.get("optional"))

    def _downward_source(self, source: dict[str, Any]) -> dict[str, bytes]:
        files = {}
        for item in source.get("items") or []:
            if "fieldRef" in item:
                files[item["path"]] = self._field(item["fieldRef"]["fieldPath"]).encode()
        return files

    @staticmethod
    def _write_items(target: Path, files: dict[str, bytes]) -> None:
        for rel, content in files.items():
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)

    def _mount(self, volumes: dict[str, Path], mount: dict[str, Any]) -> str:
        mount_path = "/" + mount["mountPath"].strip("/")
        if mount["name"] not in volumes:
            raise RuntimeError(f"volumeMount {mount['name']!r} names no volume")
        source = volumes[mount["name"]]
        if mount.get("subPath"):
            source = source / mount["subPath"]
            if not source.exists():
                source.mkdir(parents=True)
        link = self.root / mount_path.lstrip("/")
        if link.is_symlink():
            if link.resolve() != source.resolve():
                log.warning("pod %s/%s: two mounts at %s; the later wins", *_ref(self.pod), mount_path)
            link.unlink()
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source)
        return mount_path

    def _resolve(self, container: _Container, mapper: _PathMapper) -> None:
        spec = container.spec
        env = self._base_env()
        for source in spec.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                ref = source["configMapRef"]
                data = self._read_config_map(ref["name"], bool(ref.get("optional")))
            else:
                ref = source["secretRef"]
                data = self._read_secret(ref["name"], bool(ref.get("optional")))
            env.update({prefix + key: mapper.map(value.decode()) for key, value in data.items()})
        for item in spec.get("env") or []:
            value = self._env_value(item, env)
            if value is not None:
                env[item["name"]] = mapper.map(value)
        argv = [_expand(arg, env) for arg in (spec.get("command") or []) + (spec.get("args") or [])]
        container.argv = [self._pod_addresses(mapper.map(arg)) for arg in argv]
        if container.argv and _PYTHON.fullmatch(Path(container.argv[0]).name):
            container.argv[0] = sys.executable
        container.env = env
        container.cwd = self.root / (spec.get("workingDir") or "").lstrip("/")
        container.cwd.mkdir(parents=True, exist_ok=True)

    def _pod_addresses(self, arg: str) -> str:
        """`arg` with each Pod DNS name in it replaced by that Pod's address (the module doc's DNS rule)."""

        def address(match: re.Match[str]) -> str:
            found = self.runner._address_of(match.group(1))
            if found is None:
                raise _ConfigMissing(f"pod {match.group(0)} has no address yet")
            return found

        return _POD_DNS.sub(address, arg)

    def _base_env(self) -> dict[str, str]:
        env = {name: os.environ[name] for name in BASE_ENV_NAMES if name in os.environ}
        # The runner's interpreter first, so `python` and console scripts come from its venv.
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", os.defpath)])
        env["PYTHONPATH"] = str(POD_SITE)
        if (kubeconfig := self._service_account_kubeconfig) is not None:
            env["KUBECONFIG"] = str(kubeconfig)
        env[DNS_KUBECONFIG_ENV] = str(self.runner.kubeconfig)
        env["HOSTNAME"] = self.name
        env["TUNELOOM_POD_ROOT"] = str(self.root)
        env["TUNELOOM_POD_IP"] = self.ip or ""
        env["TUNELOOM_BIND_ADDRESS"] = self.ip or ""
        env["TUNELOOM_POD_NAME"] = self.name
        env["TUNELOOM_POD_NAMESPACE"] = self.namespace
        env.update(self.runner.extra_env)
        return env

    @functools.cached_property
    def _service_account_kubeconfig(self) -> Path | None:
        """A kubeconfig acting as the Pod's ServiceAccount, as the kubelet mounts its token (one for
        all the Pod's containers); None for a Pod that sets automountServiceAccountToken: false."""
        spec = self.pod["spec"]
        if spec.get("automountServiceAccountToken") is False:
            return None
        account = spec.get("serviceAccountName") or "default"
        try:
            runner = self.runner
            return service_account_kubeconfig(
                runner.core, runner.kubeconfig, self.namespace, account, self.root / ".kubeconfig"
            )
        except ApiException as err:
            if err.status != 404:
                raise
            raise _ConfigMissing(f'serviceaccount "{account}" not found') from None

    def _env_value(self, item: dict[str, Any], env: dict[str, str]) -> str | None:
        if "valueFrom" not in item:
            return _expand(item.get("value", ""), env)
        source = item["valueFrom"]
        if "fieldRef" in source:
            return self._field(source["fieldRef"]["fieldPath"])
        if "resourceFieldRef" in source:
            return self._resource_field(source["resourceFieldRef"])
        ref = source.get("secretKeyRef") or source.get("configMapKeyRef")
        if ref is None:
            raise _ConfigMissing(f"env {item['name']}: unsupported valueFrom {sorted(source)}")
        optional = bool(ref.get("optional"))
        if "secretKeyRef" in source:
            data = self._read_secret(ref["name"], optional)
        else:
            data = self._read_config_map(ref["name"], optional)
        if ref["key"] not in data:
            if optional:
                return None
            raise _ConfigMissing(f"couldn't find key {ref['key']} in {ref['name']}")
        return data[ref["key"]].decode()

    def _field(self, path: str) -> str:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        simple = {
            "metadata.name": self.name,
            "metadata.namespace": self.namespace,
            "metadata.uid": self.uid,
            "spec.nodeName": self.runner.node_name,
            "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
            "status.hostIP": HOST_IP,
            "status.podIP": self.ip or "",
            "status.podIPs": self.ip or "",
        }
        if path in simple:
            return simple[path]
        match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']*)'\]", path)
        if match:
            return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
        if path in ("metadata.labels", "metadata.annotations"):
            values = meta.get(path.split(".")[1]) or {}
            return "\n".join(f'{k}="{v}"' for k, v in sorted(values.items()))
        raise _ConfigMissing(f"unsupported fieldRef {path}")

    def _resource_field(self, ref: dict[str, Any]) -> str:
        name = ref.get("containerName")
        container = next((c for c in self.containers if c.name == name), self.containers[-1])
        kind, resource = ref["resource"].split(".", 1)
        resources = container.spec.get("resources") or {}
        value = (resources.get(kind) or {}).get(resource) or self.runner._capacity.get(resource, "0")
        divisor = parse_quantity(ref.get("divisor") or "1")
        return str(int(-(-parse_quantity(value) // divisor)))  # ceiling, as the kubelet rounds up

    def _read_config_map(self, name: str, optional: bool) -> dict[str, bytes]:
        obj = self._read("config_map", name, optional)
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return data

    def _read_secret(self, name: str, optional: bool) -> dict[str, bytes]:
        obj = self._read("secret", name, optional)
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}

    def _read(self, kind: str, name: str, optional: bool) -> dict[str, Any]:
        reader = getattr(self.runner.core, f"read_namespaced_{kind}")
        try:
            response = reader(name, self.namespace, _preload_content=False, _request_timeout=_API_TIMEOUT_S)
        except ApiException as err:
            if err.status != 404:
                raise
            if optional:
                return {}
            raise _ConfigMissing(f'{kind.replace("_", "")} "{name}" not found') from None
        return dict(json.loads(response.data))

    # -- running -----------------------------------------------------------------------------

    def _run_init_containers(self) -> str | None:
        """Run init containers one after another; a phase if the Pod ended, else None to go on
        (None also when it is being stopped)."""
        for container in (c for c in self.containers if c.init):
            self._launch(container)
            while True:
                self._reap(container)
                self._maybe_restart(container)
                self._report("Pending")
                if self._stopping:
                    return None
                if self._deadline_exceeded():
                    return self._fail_deadline()
                if self._finished(container):
                    assert container.terminated is not None
                    if container.terminated["exitCode"] != 0:
                        return "Failed"
                    break
                time.sleep(_TICK_S)
        return None

    def _run_main_containers(self) -> str | None:
        main = [c for c in self.containers if not c.init]
        for container in main:
            self._launch(container)
        while True:
            for container in main:
                self._reap(container)
                self._maybe_restart(container)
                self._probe(container)
            phase = self._main_phase(main)
            self._report(phase)
            if phase in ("Succeeded", "Failed"):
                return phase
            if self._stopping:
                return None
            if self._deadline_exceeded():
                return self._fail_deadline()
            time.sleep(_TICK_S)

    @staticmethod
    def _finished(container: _Container) -> bool:
        """Ended for good: not running, and no restart pending."""
        return container.proc is None and container.restart_at is None and container.terminated is not None

    def _main_phase(self, main: list[_Container]) -> str:
        if not all(self._finished(c) for c in main):
            return "Running"
        if all(c.terminated is not None and c.terminated["exitCode"] == 0 for c in main):
            return "Succeeded"
        return "Failed"

    def _launch(self, container: _Container) -> None:
        if not container.argv:
            container.terminated = self._terminated(container, 128, "NoCommand", "no command: images are not run")
            container.waiting = None
            return
        log_path = self.runner.log_path(self.namespace, self.name, container.name)
        try:
            with log_path.open("ab") as log_file:
                container.proc = subprocess.Popen(
                    container.argv,
                    env=container.env,
                    cwd=container.cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: killed as a whole
                    preexec_fn=_die_with_parent,
                )
        except OSError as err:
            container.terminated = self._terminated(container, 128, "StartError", str(err))
            container.waiting = None
            return
        container.started_at = _now()
        container.terminated = None
        container.waiting = None
        container.ready = False
        container.probe_successes = container.probe_failures = 0
        probe = container.spec.get("readinessProbe") or {}
        container.probe_due = time.monotonic() + float(probe.get("initialDelaySeconds", 0))
        log.info("pod %s/%s: started %s (pid %d)", self.namespace, self.name, container.name, container.proc.pid)

    def _reap(self, container: _Container) -> bool:
        """Record the container's exit if its process just ended; True if it did."""
        proc = container.proc
        if proc is None or proc.poll() is None:
            return False
        code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        # A container ends with its main process: nothing it started may outlive it.
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        container.proc = None
        container.ready = False
        container.terminated = self._terminated(container, code, "Completed" if code == 0 else "Error", None)
        log.info("pod %s/%s: %s exited with %d", self.namespace, self.name, container.name, code)
        if self._should_restart(container):
            delay = _RESTART_BACKOFF_S[min(container.restarts, len(_RESTART_BACKOFF_S) - 1)]
            container.restart_at = time.monotonic() + delay
        return True

    def _should_restart(self, container: _Container) -> bool:
        policy = self._restart_policy()
        code = container.terminated["exitCode"] if container.terminated else 0
        if container.init:
            return policy != "Never" and code != 0
        return policy == "Always" or (policy == "OnFailure" and code != 0)

    def _maybe_restart(self, container: _Container) -> None:
        if container.restart_at is None or self._stopping:
            return
        if time.monotonic() < container.restart_at:
            container.waiting = ("CrashLoopBackOff", f"back-off restarting failed container {container.name}")
            return
        container.restart_at = None
        container.last_terminated = container.terminated
        container.restarts += 1
        self._launch(container)

    def _terminated(self, container: _Container, code: int, reason: str, message: str | None) -> dict[str, Any]:
        if message is None:
            message = _tail(self.runner.log_path(self.namespace, self.name, container.name))
        return {
            "exitCode": code,
            "reason": reason,
            "message": message,
            "startedAt": container.started_at or _now(),
            "finishedAt": _now(),
            "containerID": f"tuneloom://{self.uid}/{container.name}",
        }

    def _restart_policy(self) -> str:
        return str(self.pod["spec"].get("restartPolicy") or "Always")

    def _deadline_exceeded(self) -> bool:
        deadline = self.pod["spec"].get("activeDeadlineSeconds")
        if deadline is None or self.start_time is None:
            return False
        started = datetime.strptime(self.start_time, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
        return (datetime.now(timezone.utc) - started).total_seconds() > float(deadline)

    def _fail_deadline(self) -> str:
        self._kill_all(self._grace_seconds())
        self._reason = ("DeadlineExceeded", "Pod was active on the node longer than the specified deadline")
        return "Failed"

    def _kill_all(self, grace: float) -> None:
        """SIGTERM every container's process group; SIGKILL what outlives the grace period."""
        # Also containers whose main process has exited but is not reaped yet: their children
        # may still run in the process group.
        running = [c for c in self.containers if c.proc is not None]
        for container in running:
            assert container.proc is not None
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(container.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(c.running for c in running) and time.monotonic() < deadline:
            time.sleep(0.1)
        for container in running:
            proc = container.proc
            if proc is None:
                continue
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            self._reap(container)
        for container in self.containers:
            # Stopped for good: no restart is pending any more, so no back-off to report either.
            container.restart_at = None
            if container.waiting and container.waiting[0] == "CrashLoopBackOff":
                container.waiting = None

    # -- readiness ---------------------------------------------------------------------------

    def _probe(self, container: _Container) -> None:
        probe = container.spec.get("readinessProbe")
        if not container.running:
            container.ready = False
            return
        if not probe:
            container.ready = True
            return
        now = time.monotonic()
        if now < container.probe_due:
            return
        container.probe_due = now + max(1.0, float(probe.get("periodSeconds", 10)))
        if self._probe_once(container, probe):
            container.probe_successes += 1
            container.probe_failures = 0
            if container.probe_successes >= int(probe.get("successThreshold", 1)):
                container.ready = True
        else:
            container.probe_failures += 1
            container.probe_successes = 0
            if container.probe_failures >= int(probe.get("failureThreshold", 3)):
                container.ready = False

    def _probe_once(self, container: _Container, probe: dict[str, Any]) -> bool:
        timeout = max(1.0, float(probe.get("timeoutSeconds", 1)))
        if "httpGet" in probe:
            get = probe["httpGet"]
            scheme = str(get.get("scheme", "HTTP")).lower()
            host = get.get("host") or self.ip
            url = f"{scheme}://{host}:{self._port(container, get['port'])}{get.get('path', '/')}"
            headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
            return _http_probe(url, headers, timeout)
        if "tcpSocket" in probe:
            sock_spec = probe["tcpSocket"]
            address = (sock_spec.get("host") or self.ip, self._port(container, sock_spec["port"]))
            try:
                with closing(socket.create_connection(address, timeout=timeout)):
                    return True
            except OSError:
                return False
        if "exec" in probe:
            argv = list(probe["exec"].get("command") or [])
            if argv and _PYTHON.fullmatch(Path(argv[0]).name):
                argv[0] = sys.executable
            try:
                result = subprocess.run(argv, env=container.env, cwd=container.cwd, timeout=timeout, check=False)
            except (OSError, subprocess.TimeoutExpired):
                return False
            return result.returncode == 0
        return True

    @staticmethod
    def _port(container: _Container, port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for declared in container.spec.get("ports") or []:
            if declared.get("name") == port:
                return int(declared["containerPort"])
        raise ValueError(f"container {container.name} declares no port named {port!r}")

    # -- status ------------------------------------------------------------------------------

    def _report(self, phase: str) -> None:
        if self._gone.is_set():
            return
        status = self._status(phase)
        if status == self._last_status:
            return
        try:
            self.runner.core.patch_namespaced_pod_status(
                self.name,
                self.namespace,
                {"status": status},
                _content_type=_MERGE_PATCH,
                _request_timeout=_API_TIMEOUT_S,
            )
            self._last_status = status
        except ApiException as err:
            if err.status == 404:
                self._gone.set()
                self._deleting.set()
            else:
                log.warning("pod %s/%s: status update failed: %s", self.namespace, self.name, err.reason)

    def _status(self, phase: str) -> dict[str, Any]:
        main = [c for c in self.containers if not c.init]
        initialized = all(c.terminated is not None and c.terminated["exitCode"] == 0 for c in self.containers if c.init)
        ready = phase == "Running" and all(c.ready for c in main)
        completed = phase in ("Succeeded", "Failed")
        reason, message = self._reason or (None, None)
        return {
            "phase": phase,
            "reason": reason,
            "message": message,
            "hostIP": HOST_IP,
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}] if self.ip else [],
            "startTime": self.start_time,
            "conditions": [
                self._condition("PodScheduled", True),
                self._condition("Initialized", initialized or completed),
                self._condition("ContainersReady", ready, None if ready or not completed else "PodCompleted"),
                self._condition("Ready", ready, None if ready or not completed else "PodCompleted"),
            ],
            "initContainerStatuses": [self._container_status(c) for c in self.containers if c.init],
            "containerStatuses": [self._container_status(c) for c in main],
        }

    def _condition(self, kind: str, value: bool, reason: str | None = None) -> dict[str, Any]:
        status = "True" if value else "False"
        previous = self._conditions.get(kind)
        if previous is None or previous[0] != status:
            self._conditions[kind] = (status, _now())
        condition = {"type": kind, "status": status, "lastProbeTime": None}
        condition["lastTransitionTime"] = self._conditions[kind][1]
        if reason:
            condition["reason"] = reason
        return condition

    def _container_status(self, container: _Container) -> dict[str, Any]:
        if container.running:
            state: dict[str, Any] = {"running": {"startedAt": container.started_at}}
        elif container.waiting is not None or container.restart_at is not None:
            reason, message = container.waiting or ("CrashLoopBackOff", "")
            state = {"waiting": {"reason": reason, "message": message or None}}
        elif container.terminated is not None:
            state = {"terminated": container.terminated}
        else:
            state = {"waiting": {"reason": "PodInitializing"}}
        status = {
            "name": container.name,
            "image": container.spec.get("image", ""),
            "imageID": "",
            "ready": container.ready,
            "started": container.running,
            "restartCount": container.restarts,
            "state": state,
            "lastState": {"terminated": container.last_terminated} if container.last_terminated else {},
        }
        if container.running or container.terminated is not None:
            status["containerID"] = f"tuneloom://{self.uid}/{container.name}"
        return status


# -- helpers -------------------------------------------------------------------------------------


class _PathMapper:
    """Rewrites paths under a mountPath to the Pod's materialised copy (the module doc's rule)."""

    def __init__(self, root: Path, mount_paths: set[str]) -> None:
        self._root = str(root)
        self._mounts = sorted((m for m in mount_paths if m != "/"), key=len, reverse=True)

    def map(self, value: str) -> str:
        if self._under_mount(value):
            return self._root + value
        flag, sep, path = value.partition("=")
        if sep and flag.startswith("-") and self._under_mount(path):
            return f"{flag}={self._root}{path}"
        return value

    def _under_mount(self, value: str) -> bool:
        return any(value == m or value.startswith(m + "/") for m in self._mounts)


def _expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: defined names are replaced, `$$` escapes, others stay."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _ENV_REF.sub(replace, value)


def _select_items(data: dict[str, bytes], items: list[dict[str, Any]] | None, optional: Any) -> dict[str, bytes]:
    if not items:
        return dict(data)
    selected = {}
    for item in items:
        if item["key"] in data:
            selected[item["path"]] = data[item["key"]]
        elif not optional:
            raise _ConfigMissing(f"key {item['key']} not found")
    return selected


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - _MESSAGE_BYTES))
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-_MESSAGE_LINES:])


def _http_probe(url: str, headers: dict[str, str], timeout: float) -> bool:
    context = ssl._create_unverified_context()  # as the kubelet: probes do not verify certificates
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return 200 <= response.status < 400
    except urllib.error.HTTPError as err:
        return 200 <= err.code < 400
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _lost_status(pod: dict[str, Any]) -> dict[str, Any]:
    """Failed, every container terminated: what a kubelet reports for containers it lost."""
    now = _now()
    lost = {
        "exitCode": 137,
        "reason": "ContainerStatusUnknown",
        "message": "The container could not be located when the pod was terminated",
        "finishedAt": now,
    }
    statuses = []
    for container in pod.get("status", {}).get("containerStatuses") or []:
        started = (container.get("state", {}).get("running") or {}).get("startedAt") or now
        statuses.append(
            {**container, "ready": False, "started": False, "state": {"terminated": {**lost, "startedAt": started}}}
        )
    conditions = [
        {**c, "status": "False", "lastTransitionTime": now} if c.get("type") in ("Ready", "ContainersReady") else c
        for c in pod.get("status", {}).get("conditions") or []
    ]
    return {
        "phase": "Failed",
        "reason": "NodeLost",
        "message": "the tuneloom pod runner that ran this pod restarted",
        "conditions": conditions,
        "containerStatuses": statuses,
    }


def _ref(pod: dict[str, Any]) -> tuple[str, str]:
    return pod["metadata"]["namespace"], pod["metadata"]["name"]


def _node_condition(kind: str, status: str, reason: str, message: str, now: str, since: str) -> dict[str, str]:
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastHeartbeatTime": now,
        "lastTransitionTime": since,
    }


def _host_capacity() -> dict[str, str]:
    memory_kib = 0
    with suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
    return {"cpu": str(os.cpu_count() or 1), "memory": f"{memory_kib}Ki"}


def _node_info() -> dict[str, str]:
    def read(path: str) -> str:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return ""

    uname = os.uname()
    return {
        "machineID": read("/etc/machine-id"),
        "systemUUID": read("/etc/machine-id"),
        "bootID": read("/proc/sys/kernel/random/boot_id"),
        "kernelVersion": uname.release,
        "osImage": "tuneloom pod runner",
        "containerRuntimeVersion": "tuneloom://local-processes",
        "kubeletVersion": "v1.20.2",
        "kubeProxyVersion": "v1.20.2",
        "operatingSystem": "linux",
        "architecture": "amd64",
    }
