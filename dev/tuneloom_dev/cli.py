"""`tuneloom dev ...`: commands for the local development cluster and the generated files.

`tuneloom.cli` owns the top-level parser and calls `add_commands(subparsers)` through the
`tuneloom.cli_commands` entry point (dev/pyproject.toml); each leaf command sets `handler` (a
function of the parsed args returning an exit code), as the other commands do.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from tuneloom.models import cache_dir


def default_state_dir() -> Path:
    """`$TUNELOOM_CACHE_DIR/cluster`: outside any repository, shared by every checkout."""
    return cache_dir() / "cluster"


def add_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the `dev` command group to the top-level parser's subcommands."""
    dev = subparsers.add_parser("dev", help="local development infrastructure")
    groups = dev.add_subparsers(dest="dev_command", required=True, metavar="GROUP")
    cluster = groups.add_parser("cluster", help="a local Kubernetes control plane on 127.0.0.1 (no kubelet)")
    actions = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")

    up = actions.add_parser("up", help="build the binaries if needed (minutes, once), then start the cluster")
    down = actions.add_parser("down", help="stop the cluster's processes (its data is kept)")
    env = actions.add_parser("env", help="print the shell exports that point kubectl at the cluster")
    run_pods = actions.add_parser(
        "run-pods", help="run the cluster's Pods as local processes until interrupted (stands in for kubelets)"
    )
    for parser in (up, down, env, run_pods):
        parser.add_argument(
            "--state-dir",
            type=Path,
            default=None,
            help="cluster state directory (default: $TUNELOOM_CACHE_DIR/cluster)",
        )
    up.set_defaults(handler=_cluster_up)
    down.set_defaults(handler=_cluster_down)
    env.set_defaults(handler=_cluster_env)
    run_pods.set_defaults(handler=_cluster_run_pods)

    crds = groups.add_parser("crds", help="rewrite crds/ and charts/tuneloom/crds/ from the API models")
    crds.add_argument("--root", type=Path, default=None, help="the checkout (default: the one these tools are in)")
    crds.set_defaults(handler=_crds)


def _cluster(args: argparse.Namespace) -> Any:
    # Imported here so `tuneloom --help` and the other commands do not load the cluster code.
    from tuneloom_dev.cluster import LocalCluster

    return LocalCluster(args.state_dir or default_state_dir())


def _exports(env: dict[str, str]) -> str:
    return "\n".join(f"export {name}={shlex.quote(value)}" for name, value in env.items())


def _cluster_up(args: argparse.Namespace) -> int:
    from tuneloom_dev.cluster import ClusterError
    from tuneloom_dev.kubebuild import KubeBuildError

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    cluster = _cluster(args)
    try:
        cluster.up()
    except (ClusterError, KubeBuildError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Local cluster running at {cluster.server} (state and logs in {cluster.state_dir}).")
    print("It has no kubelet or scheduler: Pods stay Pending until `tuneloom dev cluster run-pods` runs them.")
    print("Use it with:")
    print(f"  {_exports(cluster.env())}")
    print("  kubectl get ns")
    print("Stop it with: tuneloom dev cluster down" + _state_dir_flag(args))
    return 0


def _cluster_down(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    cluster.down()
    print(f"Local cluster stopped (state kept in {cluster.state_dir}).")
    return 0


def _cluster_env(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    if not cluster.kubeconfig.is_file():
        hint = "tuneloom dev cluster up" + _state_dir_flag(args)
        print(f"error: no cluster has been started from {cluster.state_dir}; run: {hint}", file=sys.stderr)
        return 1
    print(_exports(cluster.env()))
    return 0


def _cluster_run_pods(args: argparse.Namespace) -> int:
    from tuneloom_dev.podrunner import PodRunner

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    cluster = _cluster(args)
    if not cluster.is_running():
        print("error: the cluster is not running; start it with: tuneloom dev cluster up", file=sys.stderr)
        return 1
    runner = PodRunner(cluster.kubeconfig, work_dir=cluster.state_dir / "pods")
    print(f"Running Pods under {runner.work_dir}; Ctrl-C stops them.", file=sys.stderr)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with runner:
        while not stop.wait(1.0):
            pass
    return 0


def _crds(args: argparse.Namespace) -> int:
    from tuneloom_dev.crds import CHECKOUT, write_crds

    try:
        written = write_crds(args.root or CHECKOUT)
    except FileNotFoundError as err:
        print(f"error: {err}; pass --root", file=sys.stderr)
        return 1
    print("\n".join(str(path) for path in written))
    return 0


def _state_dir_flag(args: argparse.Namespace) -> str:
    return f" --state-dir {shlex.quote(str(args.state_dir))}" if args.state_dir else ""
