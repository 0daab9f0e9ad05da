"""A real, local Kubernetes control plane for tests and development: etcd + kube-apiserver +
kube-controller-manager on 127.0.0.1.

The binaries come from `tuneloom_dev.kubebuild` (Kubernetes v1.20.2 built from Debian's source
package). There is no kubelet and no scheduler: Pods stay Pending unless something binds and runs
them (see `tuneloom_dev.podrunner`). Everything else is the real thing: RBAC, CRDs, watches,
admission, the Job controller and garbage collection.

Every port is picked free at start-up and every component binds to 127.0.0.1 only. Processes are
started in their own sessions so a cluster brought up by `tuneloom dev cluster up` outlives the
command; pid files (pid plus the kernel's start time, so a recycled pid is never mistaken for
ours) let a later `down` stop exactly the processes `up` started.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import secrets
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import yaml

from tuneloom.net import LOCALHOST, free_port
from tuneloom_dev.kubebuild import KubeBinaries, ensure_etcd, ensure_kube_binaries

if TYPE_CHECKING:
    from kubernetes import client as k8s

log = logging.getLogger("tuneloom_dev.cluster")

CLUSTER_NAME = "tuneloom-local"
ADMIN_USER = "tuneloom-admin"
SERVICE_CIDR = "10.96.0.0/24"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_ACCOUNT_TOKEN_S = 24 * 3600  # longer than any test's Pod lives; the kubelet would refresh it
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager")

_START_TIMEOUT_S = 180.0
_STOP_GRACE_S = 15.0
_START_ATTEMPTS = 3
_LOG_TAIL_CHARS = 3000
_PORT_CLASH_MARKERS = ("address already in use", "bind: address")


class ClusterError(RuntimeError):
    """The cluster could not be started; the message carries the failing component's log tail."""


@dataclass
class _Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int


@dataclass(frozen=True)
class _PidRecord:
    pid: int
    start_ticks: int  # field 22 of /proc/<pid>/stat: distinguishes a recycled pid from ours


class LocalCluster:
    """etcd, kube-apiserver and kube-controller-manager with their state under `state_dir`.

    `up()` reuses a healthy cluster already running from the same state dir (say, one started by
    `tuneloom dev cluster up`); `down()` stops only the processes named in the pid files. As a
    context manager it brings the cluster up and stops it on exit.
    """

    def __init__(self, state_dir: Path, binaries: KubeBinaries | None = None, etcd: Path | None = None) -> None:
        self.state_dir = Path(state_dir).resolve()
        self._binaries = binaries
        self._etcd = etcd
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._ports: _Ports | None = None
        self._token: str | None = None

    # -- paths -------------------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def _run_dir(self) -> Path:
        return self.state_dir / "run"

    @property
    def _state_file(self) -> Path:
        return self.state_dir / "cluster.json"

    def log_path(self, component: str) -> Path:
        return self.log_dir / f"{component}.log"

    # -- public API --------------------------------------------------------------------------

    @property
    def server(self) -> str:
        """The API server's URL, e.g. https://127.0.0.1:40123."""
        return f"https://{LOCALHOST}:{self._require_ports().apiserver}"

    @property
    def token(self) -> str:
        """The admin bearer token (member of system:masters)."""
        if self._token is None:
            self._token = self._load_or_create_token()
        return self._token

    @property
    def ca_file(self) -> Path:
        return self.pki_dir / "ca.crt"

    def env(self) -> dict[str, str]:
        """Environment variables that point kubectl, helm and client libraries at this cluster."""
        return {"KUBECONFIG": str(self.kubeconfig)}

    def up(self, timeout: float = _START_TIMEOUT_S) -> LocalCluster:
        """Start the cluster, or adopt the one already running from this state dir."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for sub in (self.log_dir, self.pki_dir, self._run_dir):
            sub.mkdir(exist_ok=True)
        with self._lock():
            if self._adopt_running():
                log.info("reusing the cluster already running from %s (%s)", self.state_dir, self.server)
                return self
            self._stop_recorded()  # leftovers of a half-dead cluster
            self._start(timeout)
        return self

    def down(self) -> None:
        """Stop the processes this state dir's pid files name; the data stays for the next `up`."""
        if not self.state_dir.is_dir():
            return
        with self._lock():
            self._stop_recorded()

    def is_running(self) -> bool:
        """Whether every component's recorded process is alive and the API server is ready."""
        return all(self._recorded_alive(name) for name in COMPONENTS) and self._ready(self._load_ports())

    def running_pids(self) -> dict[str, int]:
        """The pids of this cluster's live processes, by component."""
        pids = {}
        for name in COMPONENTS:
            record = self._read_pid(name)
            if record is not None and _alive(record):
                pids[name] = record.pid
        return pids

    def __enter__(self) -> LocalCluster:
        return self.up()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()

    # -- start-up ----------------------------------------------------------------------------

    def _start(self, timeout: float) -> None:
        binaries = self._binaries or ensure_kube_binaries()
        etcd = self._etcd or ensure_etcd()
        self._ensure_pki()
        started = time.monotonic()
        for attempt in range(1, _START_ATTEMPTS + 1):
            # A port picked free can be taken before the component binds it; retry with new ones.
            ports = self._pick_ports(prefer_previous=attempt == 1)
            try:
                self._start_with(ports, binaries, etcd, timeout)
                break
            except ClusterError as err:
                self._stop_recorded()
                if attempt == _START_ATTEMPTS or not any(m in str(err) for m in _PORT_CLASH_MARKERS):
                    raise
                log.warning("port clash while starting the cluster; retrying with new ports")
        log.info(
            "cluster ready at %s in %.1f s (KUBECONFIG=%s)", self.server, time.monotonic() - started, self.kubeconfig
        )

    def _start_with(self, ports: _Ports, binaries: KubeBinaries, etcd: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self._ports = ports
        self._state_file.write_text(json.dumps({"ports": asdict(ports)}, indent=2) + "\n")
        self._write_kubeconfig(ports)
        self._spawn("etcd", self._etcd_command(etcd, ports))
        self._wait("etcd", lambda: _http_ok(f"http://{LOCALHOST}:{ports.etcd_client}/health"), deadline)
        self._spawn("kube-apiserver", self._apiserver_command(binaries.apiserver, ports))
        self._wait("kube-apiserver", lambda: self._ready(ports), deadline)
        self._spawn("kube-controller-manager", self._controller_manager_command(binaries.controller_manager))
        # The namespace comes from the API server's bootstrap; the ServiceAccount from the
        # controller manager's serviceaccount controller, so this also proves that one works.
        self._wait(
            "kube-controller-manager",
            lambda: self._get_ok(ports, "/api/v1/namespaces/default/serviceaccounts/default"),
            deadline,
        )

    def _etcd_command(self, etcd: Path, ports: _Ports) -> list[str]:
        client = f"http://{LOCALHOST}:{ports.etcd_client}"
        peer = f"http://{LOCALHOST}:{ports.etcd_peer}"
        return [
            str(etcd),
            f"--name={CLUSTER_NAME}",
            f"--data-dir={self.state_dir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={CLUSTER_NAME}={peer}",
            "--initial-cluster-state=new",
            # Tests churn objects; keep the database small without a manual defrag.
            "--auto-compaction-mode=periodic",
            "--auto-compaction-retention=1h",
        ]

    def _apiserver_command(self, apiserver: Path, ports: _Ports) -> list[str]:
        pki = self.pki_dir
        return [
            str(apiserver),
            f"--etcd-servers=http://{LOCALHOST}:{ports.etcd_client}",
            f"--bind-address={LOCALHOST}",
            f"--advertise-address={LOCALHOST}",
            f"--secure-port={ports.apiserver}",
            "--insecure-port=0",
            f"--cert-dir={pki}",  # never the default /var/run/kubernetes
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={pki / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            f"--service-account-key-file={pki / 'sa.key'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # No kubelets, so no endpoints to reconcile for the `kubernetes` Service.
            "--endpoint-reconciler-type=none",
            # It would demand a token Secret per ServiceAccount, which only the disabled token
            # controller could create.
            "--disable-admission-plugins=ServiceAccount",
            "--allow-privileged=true",
            "--profiling=false",
        ]

    def _controller_manager_command(self, controller_manager: Path) -> list[str]:
        pki = self.pki_dir
        return [
            str(controller_manager),
            f"--kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            # The token controller needs the serving CA in every ServiceAccount token Secret and
            # is of no use without a kubelet mounting them.
            "--controllers=*,-serviceaccount-token",
            "--secure-port=0",
            "--port=0",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            "--profiling=false",
        ]

    def _spawn(self, name: str, command: list[str]) -> None:
        log.debug("starting %s: %s", name, " ".join(command))
        with self.log_path(name).open("ab") as log_file:
            log_file.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}\n".encode())
            log_file.flush()
            # Own session: survives the process that ran `up`, and Ctrl-C in a terminal running
            # the tests does not kill the control plane before the fixture stops it in order.
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                start_new_session=True,
            )
        self._procs[name] = proc
        start_ticks = _start_ticks(proc.pid)
        record = {"pid": proc.pid, "start_ticks": start_ticks}
        _write_atomic(self._pid_file(name), json.dumps(record) + "\n")

    def _wait(self, name: str, ready: Any, deadline: float) -> None:
        while True:
            proc = self._procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise ClusterError(f"{name} exited with code {proc.returncode}:\n{self._log_tail(name)}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"{name} was not ready in time:\n{self._log_tail(name)}")
            time.sleep(0.25)

    def _pick_ports(self, prefer_previous: bool) -> _Ports:
        """Free ports; on a restart the previous ones if still free, so etcd's stored member URL
        and anything that cached the server address stay valid."""
        previous = self._load_ports() if prefer_previous else None
        if previous is not None and all(_port_free(p) for p in asdict(previous).values()):
            return previous
        return _Ports(etcd_client=free_port(), etcd_peer=free_port(), apiserver=free_port())

    # -- credentials -------------------------------------------------------------------------

    def _ensure_pki(self) -> None:
        """A CA, the API server's serving cert signed by it, the ServiceAccount signing key and
        the admin token. Kept across restarts so existing kubeconfigs and tokens stay valid."""
        pki = self.pki_dir
        if not (pki / "ca.crt").is_file() or not (pki / "ca.key").is_file():
            _openssl(
                "req", "-x509", "-new", "-nodes", "-newkey", "rsa:2048", "-sha256", "-days", "3650",
                "-keyout", pki / "ca.key", "-out", pki / "ca.crt", "-subj", f"/CN={CLUSTER_NAME}-ca",
            )  # fmt: skip
        if not (pki / "apiserver.crt").is_file():
            self._issue_serving_cert()
        if not (pki / "sa.key").is_file():
            _openssl("genrsa", "-out", pki / "sa.key", "2048")
        token = self.token
        # Format: token,user,uid,"groups". system:masters is bound to cluster-admin by RBAC.
        _write_atomic(pki / "tokens.csv", f'{token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n', mode=0o600)
        for key in ("ca.key", "apiserver.key", "sa.key"):
            (pki / key).chmod(0o600)

    def _issue_serving_cert(self) -> None:
        pki = self.pki_dir
        # The in-cluster names too, so a client configured the in-cluster way verifies as well.
        names = ["IP:127.0.0.1", "IP:10.96.0.1", "DNS:localhost", "DNS:kubernetes", "DNS:kubernetes.default"]
        names += ["DNS:kubernetes.default.svc", "DNS:kubernetes.default.svc.cluster.local"]
        ext = pki / "apiserver.ext"
        ext.write_text(
            f"subjectAltName={','.join(names)}\nbasicConstraints=CA:FALSE\n"
            "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        )
        _openssl(
            "req", "-new", "-nodes", "-newkey", "rsa:2048", "-keyout", pki / "apiserver.key",
            "-out", pki / "apiserver.csr", "-subj", "/CN=kube-apiserver",
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", pki / "apiserver.csr", "-CA", pki / "ca.crt", "-CAkey", pki / "ca.key",
            "-CAcreateserial", "-sha256", "-days", "3650", "-extfile", ext, "-out", pki / "apiserver.crt",
        )  # fmt: skip

    def _load_or_create_token(self) -> str:
        path = self.pki_dir / "admin.token"
        if path.is_file():
            return path.read_text().strip()
        self.pki_dir.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(24)
        _write_atomic(path, token + "\n", mode=0o600)
        return token

    def _write_kubeconfig(self, ports: _Ports) -> None:
        ca = base64.b64encode(self.ca_file.read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": CLUSTER_NAME,
                    "cluster": {"server": f"https://{LOCALHOST}:{ports.apiserver}", "certificate-authority-data": ca},
                }
            ],
            "users": [{"name": ADMIN_USER, "user": {"token": self.token}}],
            "contexts": [
                {"name": CLUSTER_NAME, "context": {"cluster": CLUSTER_NAME, "user": ADMIN_USER, "namespace": "default"}}
            ],
            "current-context": CLUSTER_NAME,
        }
        _write_atomic(self.kubeconfig, yaml.safe_dump(config, sort_keys=False), mode=0o600)

    # -- health ------------------------------------------------------------------------------

    def _ready(self, ports: _Ports | None) -> bool:
        return ports is not None and self._get_ok(ports, "/readyz")

    def _get_ok(self, ports: _Ports, path: str) -> bool:
        request = urllib.request.Request(
            f"https://{LOCALHOST}:{ports.apiserver}{path}", headers={"Authorization": f"Bearer {self.token}"}
        )
        context = ssl.create_default_context(cafile=str(self.ca_file))
        return _http_ok(request, context=context)

    def _adopt_running(self) -> bool:
        ports = self._load_ports()
        if ports is None or not all(self._recorded_alive(name) for name in COMPONENTS):
            return False
        self._ports = ports
        if not self.ca_file.is_file() or not self._ready(ports):
            return False
        if not self.kubeconfig.is_file():
            self._write_kubeconfig(ports)
        return True

    def _load_ports(self) -> _Ports | None:
        if self._ports is not None:
            return self._ports
        try:
            return _Ports(**json.loads(self._state_file.read_text())["ports"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _require_ports(self) -> _Ports:
        ports = self._load_ports()
        if ports is None:
            raise ClusterError(f"no cluster has been started from {self.state_dir}")
        return ports

    # -- stopping ----------------------------------------------------------------------------

    def _stop_recorded(self) -> None:
        # Reverse order: the controller manager and API server first, so they do not log a storm
        # of connection errors while etcd goes away under them.
        for name in reversed(COMPONENTS):
            record = self._read_pid(name)
            if record is not None and _alive(record):
                log.info("stopping %s (pid %d)", name, record.pid)
                _terminate(record, self._procs.get(name))
            proc = self._procs.pop(name, None)
            if proc is not None:
                proc.poll()  # reap, so no zombie lingers
            self._pid_file(name).unlink(missing_ok=True)

    def _pid_file(self, name: str) -> Path:
        return self._run_dir / f"{name}.pid"

    def _read_pid(self, name: str) -> _PidRecord | None:
        try:
            data = json.loads(self._pid_file(name).read_text())
            return _PidRecord(pid=int(data["pid"]), start_ticks=int(data["start_ticks"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _recorded_alive(self, name: str) -> bool:
        record = self._read_pid(name)
        return record is not None and _alive(record)

    def _log_tail(self, name: str) -> str:
        try:
            return self.log_path(name).read_text(errors="replace")[-_LOG_TAIL_CHARS:]
        except OSError:
            return "(no log)"

    @contextmanager
    def _lock(self) -> Iterator[None]:
        with (self.state_dir / ".lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


# -- process helpers ---------------------------------------------------------------------------


def service_account_kubeconfig(
    core: k8s.CoreV1Api, admin_kubeconfig: Path, namespace: str, account: str, dest: Path
) -> Path:
    """A kubeconfig of the cluster that `admin_kubeconfig` reaches, acting as the ServiceAccount
    with a fresh token of it, so a process run with it has exactly the RBAC that account is bound to."""
    request = {"spec": {"expirationSeconds": SERVICE_ACCOUNT_TOKEN_S}}
    token = core.create_namespaced_service_account_token(account, namespace, request).status.token
    config = yaml.safe_load(admin_kubeconfig.read_text())
    config["users"] = [{"name": account, "user": {"token": token}}]
    for context in config["contexts"]:
        context["context"]["user"] = account
    _write_atomic(dest, yaml.safe_dump(config), 0o600)
    return dest


def _start_ticks(pid: int) -> int:
    """The process's start time in clock ticks since boot, or -1 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    # The command name (field 2) may contain spaces and parentheses; fields after it are plain.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])


def _alive(record: _PidRecord) -> bool:
    try:
        stat = Path(f"/proc/{record.pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0] != "Z" and int(fields[19]) == record.start_ticks


def _terminate(record: _PidRecord, proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM the process (its own process group), then SIGKILL if it outlives the grace."""
    _signal(record, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE_S
    while time.monotonic() < deadline:
        if proc is not None:
            proc.poll()
        if not _alive(record):
            return
        time.sleep(0.1)
    log.warning("pid %d ignored SIGTERM for %.0f s; killing it", record.pid, _STOP_GRACE_S)
    _signal(record, signal.SIGKILL)
    if proc is not None:
        proc.wait(timeout=10)


def _signal(record: _PidRecord, sig: signal.Signals) -> None:
    if not _alive(record):
        return
    # Started with start_new_session, so the pid is also its process group's id.
    with suppress(ProcessLookupError):
        os.killpg(record.pid, sig)


def _openssl(*args: object) -> None:
    result = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ClusterError(f"openssl {args[0]} failed: {result.stderr.strip()}")


def _write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)


def _http_ok(request: str | urllib.request.Request, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _port_free(port: int) -> bool:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        # As the servers do (Go sets SO_REUSEADDR): connections of the previous run lingering in
        # TIME_WAIT must not make the port look taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOCALHOST, port))
        except OSError:
            return False
        return True
