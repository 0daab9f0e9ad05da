"""The Job a FineTuneJob becomes, and how Job and Pod states read (pure logic, no cluster)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneloom.api import TRAINER_EXIT_INVALID_INPUT, TRAINER_EXIT_PREEMPTED, Phase
from tuneloom.jobfile import load_job, parse_job
from tuneloom.operator.config import OperatorConfig
from tuneloom.operator.jobbuilder import build_job, job_name, spec_hash
from tuneloom.operator.observe import observe


def _job(**spec: Any):
    body = {
        "baseModel": "s3://models/smollm2",
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"adapterName": "tickets", "uri": "s3://adapters"},
        "storage": {"credentialsSecret": "s3", "endpoint": "http://minio:9000"},
        **spec,
    }
    return parse_job(
        {
            "apiVersion": "tuneloom.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "tickets", "namespace": "team-a", "uid": "1234-abcd"},
            "spec": body,
        }
    )


def _container(job) -> dict[str, Any]:
    return build_job(job, OperatorConfig())["spec"]["template"]["spec"]["containers"][0]


def test_one_gpu_runs_python_and_requests_the_gpu() -> None:
    container = _container(_job())
    assert container["command"] == ["python", "-m", "tuneloom.trainer"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_several_gpus_run_torchrun_one_process_each() -> None:
    container = _container(_job(resources={"gpus": 4}))
    assert container["command"][:3] == ["torchrun", "--standalone", "--nproc_per_node=4"]


def test_credentials_are_referenced_never_inlined() -> None:
    env = {item["name"]: item for item in _container(_job())["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"] == {
        "name": "AWS_SECRET_ACCESS_KEY",
        "valueFrom": {"secretKeyRef": {"name": "s3", "key": "AWS_SECRET_ACCESS_KEY"}},
    }
    assert env["TUNELOOM_S3_ENDPOINT"]["value"] == "http://minio:9000"


def test_trainer_endpoints_listen_on_every_interface() -> None:
    # The operator and Prometheus reach /progress and /metrics on the pod IP; port-forward on localhost.
    env = {item["name"] for item in _container(_job())["env"]}
    assert "TUNELOOM_BIND_ADDRESS" not in env


def test_scheduling_fields_reach_the_job() -> None:
    job = build_job(
        _job(
            scheduling={"queueName": "gpu-queue", "activeDeadlineSeconds": 3600, "backoffLimit": 1},
            resources={
                "gpus": 1,
                "nodeSelector": {"gpu": "h100"},
                "tolerations": [{"key": "gpu", "operator": "Exists"}],
            },
        ),
        OperatorConfig(),
    )
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["spec"]["activeDeadlineSeconds"] == 3600 and job["spec"]["backoffLimit"] == 1
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert job["metadata"]["ownerReferences"][0]["uid"] == "1234-abcd"


def test_trainer_runs_as_its_own_tokenless_service_account() -> None:
    from tuneloom.operator.jobbuilder import build_service_account

    pod = build_job(_job(), OperatorConfig())["spec"]["template"]["spec"]
    account = build_service_account(_job(), OperatorConfig())
    assert pod["serviceAccountName"] == account["metadata"]["name"] == "tuneloom-trainer"
    assert pod["automountServiceAccountToken"] is False and account["automountServiceAccountToken"] is False


def test_job_carries_the_job_file_the_trainer_reads(tmp_path: Path) -> None:
    built = build_job(_job(), OperatorConfig())
    template = built["spec"]["template"]
    container = template["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if env["TUNELOOM_JOB_FILE"].startswith(m["mountPath"] + "/"))
    volume = next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])
    (item,) = volume["downwardAPI"]["items"]
    assert env["TUNELOOM_JOB_FILE"] == f"{mount['mountPath']}/{item['path']}"
    annotation = item["fieldRef"]["fieldPath"].removeprefix("metadata.annotations['").removesuffix("']")
    # What the kubelet writes into the file, read by the trainer's own loader.
    job_file = tmp_path / item["path"]
    job_file.write_text(template["metadata"]["annotations"][annotation])
    loaded = load_job(job_file)
    assert loaded.spec.output.adapterName == "tickets"
    assert loaded.metadata.uid == "1234-abcd"
    assert loaded.spec == _job().spec


def test_trainer_serves_progress_where_the_operator_polls_and_writes_no_progress_file() -> None:
    """The operator reads progress over HTTP only (the pod IP, the trainer metrics port, /progress); the
    trainer listens on every interface of its pod, so no bind address is set."""
    pod = build_job(_job(), OperatorConfig(trainer_metrics_port=9511))["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["TUNELOOM_METRICS_PORT"]["value"] == "9511"
    assert "TUNELOOM_BIND_ADDRESS" not in env
    assert container["ports"] == [{"name": "metrics", "containerPort": 9511}]
    assert "TUNELOOM_PROGRESS_FILE" not in env
    assert {v["name"] for v in pod["volumes"]} == {m["name"] for m in container["volumeMounts"]}
    assert {v["name"] for v in pod["volumes"]} == {"job", "dshm", "cache", "tmp"}


def test_long_names_fit_and_stay_distinct() -> None:
    a, b = job_name("x" * 80), job_name("x" * 79 + "y")
    assert len(a) <= 63 and len(b) <= 63 and a != b


def test_cancel_is_not_a_spec_change() -> None:
    assert spec_hash(_job()) == spec_hash(_job(cancel=True))
    assert spec_hash(_job()) != spec_hash(_job(hyperparameters={"epochs": 9}))


def _failed_job(reason: str | None = None) -> dict[str, Any]:
    condition = {"type": "Failed", "status": "True", "reason": reason, "message": "details"}
    return {"status": {"conditions": [condition]}}


def _pod(**state: Any) -> dict[str, Any]:
    return {"status": {"phase": "Failed", "containerStatuses": [{"state": state}]}}


def test_failures_read_as_something_to_act_on() -> None:
    oom = observe(_failed_job("BackoffLimitExceeded"), [_pod(terminated={"reason": "OOMKilled", "exitCode": 137})])
    assert (oom.phase, oom.reason) == (Phase.failed, "OOMKilled") and "spec.resources.memory" in oom.message
    deadline = observe(_failed_job("DeadlineExceeded"), [])
    assert deadline.reason == "DeadlineExceeded" and "activeDeadlineSeconds" in deadline.message
    invalid = observe(
        _failed_job("BackoffLimitExceeded"),
        [_pod(terminated={"exitCode": 2, "message": "loading\nerror: data.jsonl:3: messages: missing"})],
    )
    assert invalid.reason == "ExitCode2" and "data.jsonl:3: messages: missing" in invalid.message


def test_pod_states_before_the_end() -> None:
    pulling = {
        "status": {"phase": "Pending", "containerStatuses": [{"state": {"waiting": {"reason": "ImagePullBackOff"}}}]}
    }
    assert observe({"status": {}}, [pulling]).reason == "ImagePullBackOff"
    assert observe({"status": {}}, [{"status": {"phase": "Running"}}]).phase is Phase.running
    done = {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    assert observe(done, []).phase is Phase.succeeded


def test_preempted_pods_get_their_grace_period_and_do_not_count_as_failures() -> None:
    default = build_job(_job(), OperatorConfig())
    assert default["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 120
    job = build_job(_job(checkpointing={"gracePeriodSeconds": 600}), OperatorConfig())
    assert job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 600
    rules = job["spec"]["podFailurePolicy"]["rules"]
    actions = [(rule["action"], (rule.get("onExitCodes") or {}).get("values")) for rule in rules]
    assert actions[:2] == [("FailJob", [TRAINER_EXIT_INVALID_INPUT]), ("Ignore", [TRAINER_EXIT_PREEMPTED])]
    assert rules[2] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}


def test_a_preempted_pod_leaves_the_job_pending_for_its_retry() -> None:
    preempted = {
        "status": {
            "phase": "Failed",
            "containerStatuses": [{"state": {"terminated": {"exitCode": TRAINER_EXIT_PREEMPTED, "reason": "Error"}}}],
        }
    }
    retry = {"status": {"phase": "Pending"}}
    assert observe({"status": {}}, [preempted, retry]).phase is Phase.pending
    assert observe({"status": {}}, [preempted, {"status": {"phase": "Running"}}]).phase is Phase.running
