"""Adapters: the checks that make one Ready (pure, no cluster), then the operator against a real API
server and SeaweedFS: the Adapter a succeeded FineTuneJob leaves, a hand-made PEFT folder imported,
and a corrupt adapter or one for another base model refused with a clear reason."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from tuneloom.jobfile import parse_job
from tuneloom.models import model_config_hash
from tuneloom.names import AdapterId
from tuneloom.operator.adapters import AdapterProblem, adapter_for_job, check_peft_files, same_base_model
from tuneloom.registry import (
    ADAPTER_FILES,
    ADAPTER_WEIGHTS,
    list_versions,
    publish_adapter,
    read_adapter,
)
from tuneloom.storage import ObjectStore, open_store
from tuneloom_dev.seaweedfs import SeaweedFS

from . import test_operator
from .kube import KubeCluster, kubectl, wait_for
from .test_operator import ROOT, Bench, Operator, _dataset, _operator_kubeconfig, assert_no_operator_state

GROUP, VERSION = "tuneloom.dev", "v1alpha1"
bench = test_operator.bench  # the fixture: a namespace, a bucket, an S3 Secret and the tiny model


# -- shared with test_modelserver.py: all three CRDs and an operator with short intervals ------------


@pytest.fixture(scope="module")
def serving_crds(kube_cluster: KubeCluster, api: k8s.ApiClient) -> None:
    for name in ("finetunejobs", "adapters", "modelservers"):
        kubectl(kube_cluster, "apply", "-f", str(ROOT / "crds" / f"{name}.yaml"))
    extensions = k8s.ApiextensionsV1Api(api)

    def established() -> bool:
        for name in ("finetunejobs", "adapters", "modelservers"):
            crd = extensions.read_custom_resource_definition(f"{name}.{GROUP}")
            if not any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or []):
                return False
        return True

    wait_for(established, "the CRDs to be established")


@pytest.fixture(scope="module")
def serving_operator(
    kube_cluster: KubeCluster, api: k8s.ApiClient, serving_crds: None, pod_runner, tmp_path_factory
) -> Iterator[Operator]:
    kubeconfig = _operator_kubeconfig(kube_cluster, api, tmp_path_factory.mktemp("operator") / "kubeconfig")
    runner = Operator(
        kubeconfig,
        tmp_path_factory.mktemp("operator-logs"),
        env={
            "TUNELOOM_SERVER_SYNC_INTERVAL_SECONDS": "1",
            "TUNELOOM_ADAPTER_RESYNC_INTERVAL_SECONDS": "2",
            # The pod runner's pods share the host's network: each server binds its own pod IP.
            "TUNELOOM_SERVER_BIND_ADDRESS": "$(TUNELOOM_POD_IP)",
        },
    )
    runner.start()
    yield runner
    runner.stop()


def adapter_manifest(name: str, base_model: str, bench: Bench, **source: Any) -> dict[str, Any]:
    storage = {
        "uri": f"{bench.bucket_uri}/out",
        "endpoint": bench.seaweedfs.endpoint,
        "credentialsSecret": "s3-credentials",
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Adapter",
        "metadata": {"name": name},
        "spec": {"baseModel": base_model, "source": source, "storage": storage},
    }


def get_object(bench: Bench, plural: str, name: str) -> dict[str, Any]:
    return bench.custom.get_namespaced_custom_object(GROUP, VERSION, bench.namespace, plural, name)


def wait_adapter(bench: Bench, name: str, *phases: str, timeout: float = 120) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        status = get_object(bench, "adapters", name).get("status") or {}
        return status if status.get("phase") in phases else None

    return wait_for(reached, f"Adapter {name} to reach {phases}", timeout=timeout)


def ready_condition(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == "Ready")


@pytest.fixture(scope="session")
def peft_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real PEFT LoRA folder for the tiny model, as peft saves it elsewhere (no manifest)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("peft") / "adapter"
    get_peft_model(model, config).save_pretrained(out)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    return out


def publish_peft(bench: Bench, folder: Path, name: str, **manifest: Any) -> ObjectStore:
    """Publishes a PEFT folder as the next version of `name`, for the tiny model, with `manifest` added."""
    store = open_store(f"{bench.bucket_uri}/out")
    base = {"name": str(bench.model), "configSha256": model_config_hash(bench.model)}
    files = {file_name: folder / file_name for file_name in ADAPTER_FILES}
    publish_adapter(store, bench.namespace, name, files, {"kind": "lora", "baseModel": base, "metrics": {}, **manifest})
    return store


def upload_peft(store: ObjectStore, prefix: str, folder: Path) -> None:
    for name in ADAPTER_FILES:
        store.put_file(f"{prefix}/{name}", folder / name)


# -- pure checks -----------------------------------------------------------------------------------


def test_peft_folder_checks(peft_dir: Path, tmp_path: Path) -> None:
    assert check_peft_files(peft_dir)["r"] == 4
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "adapter_config.json").write_bytes((peft_dir / "adapter_config.json").read_bytes())
    (damaged / ADAPTER_WEIGHTS).write_bytes((peft_dir / ADAPTER_WEIGHTS).read_bytes()[:-10])
    with pytest.raises(AdapterProblem, match="truncated or damaged") as truncated:
        check_peft_files(damaged)
    assert truncated.value.reason == "InvalidAdapter"
    (damaged / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING", "r": 4}))
    with pytest.raises(AdapterProblem, match="only LoRA"):
        check_peft_files(damaged)


def test_base_model_names_compare_by_known_model() -> None:
    assert same_base_model("HuggingFaceTB/SmolLM2-135M-Instruct", "huggingfacetb/smollm2-135m-instruct")
    assert same_base_model("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert same_base_model("s3://models/smol/", "s3://models/smol")
    assert not same_base_model("s3://models/smol", "HuggingFaceTB/SmolLM2-135M-Instruct")


def test_a_jobs_adapter_follows_the_registry_and_has_no_owner() -> None:
    job = parse_job(
        {
            "apiVersion": "tuneloom.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "tickets-run-3", "namespace": "team-a", "uid": "u-1"},
            "spec": {
                "baseModel": "s3://models/smollm2",
                "dataset": {"train": "s3://data/train.jsonl"},
                "output": {"adapterName": "tickets", "uri": "s3://adapters"},
                "storage": {"credentialsSecret": "s3", "endpoint": "http://minio:9000"},
            },
        }
    )
    body = adapter_for_job(job)
    assert body["metadata"] == {
        "name": "tickets",
        "namespace": "team-a",
        "labels": {"app.kubernetes.io/managed-by": "tuneloom-operator", "tuneloom.dev/finetunejob": "tickets-run-3"},
    }
    assert body["spec"] == {
        "baseModel": "s3://models/smollm2",
        "source": {"registry": {"name": "tickets"}},
        "storage": {"uri": "s3://adapters", "endpoint": "http://minio:9000", "credentialsSecret": "s3"},
    }


# -- against the cluster ---------------------------------------------------------------------------


def test_succeeded_job_leaves_a_ready_adapter_and_preloads_it(
    kube_cluster: KubeCluster, serving_operator: Operator, bench: Bench
) -> None:
    server = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelServer",
        "metadata": {"name": "srv"},
        "spec": {
            "baseModel": str(bench.model),
            "replicas": 0,  # no pods: this test is about the preload list, not serving
            "resources": {"gpus": 0},
            "storage": {"uri": f"{bench.bucket_uri}/out", "endpoint": bench.seaweedfs.endpoint},
        },
    }
    bench.custom.create_namespaced_custom_object(GROUP, VERSION, bench.namespace, "modelservers", server)
    data = bench.upload_data("train.jsonl", _dataset())
    bench.apply(bench.manifest("pirate", data, hyperparameters={"epochs": 2}, serve={"modelServer": "srv"}))
    job = bench.wait_phase("pirate", "Succeeded", "Failed")
    assert job["phase"] == "Succeeded", job
    served = next(c for c in job["conditions"] if c["type"] == "Served")
    assert (served["status"], served["reason"]) == ("True", "PreloadAdded")
    assert get_object(bench, "modelservers", "srv")["spec"]["preload"]["adapters"] == ["pirate"]

    status = wait_adapter(bench, "pirate", "Ready", "Failed")
    assert status["phase"] == "Ready", status
    published = job["adapter"]
    assert (status["version"], status["sha256"], status["uri"]) == (
        published["version"],
        published["sha256"],
        published["uri"],
    )
    assert status["model"] == f"{bench.namespace}/pirate@{published['version']}"
    assert status["validationLoss"] == published["validationLoss"]
    assert status["baseValidationLoss"] == published["baseValidationLoss"]
    assert 0 < status["tokenAccuracy"] <= 1 and status["rank"] == 4
    assert "config hash matches" in ready_condition(status)["message"]
    adapter = get_object(bench, "adapters", "pirate")
    assert not adapter["metadata"].get("ownerReferences"), "the Adapter must outlive its FineTuneJob"
    assert adapter["metadata"]["labels"]["tuneloom.dev/finetunejob"] == "pirate"

    table = kubectl(kube_cluster, "-n", bench.namespace, "get", "adapters").splitlines()
    header = table[0].split()
    assert header == ["NAME", "PHASE", "BASE", "MODEL", "VERSION", "VAL", "LOSS", "PROMOTED", "LOADED", "ON", "AGE"]
    row = table[1].split()
    assert row[:4] == ["pirate", "Ready", str(bench.model), published["version"]], table
    assert float(row[4]) == pytest.approx(published["validationLoss"], abs=1e-3) and row[5] == "true", table
    kubectl(kube_cluster, "-n", bench.namespace, "wait", "--for=condition=Ready", "adapter/pirate", "--timeout=10s")

    # The job's namesake stays after the job goes.
    bench.custom.delete_namespaced_custom_object(GROUP, VERSION, bench.namespace, "finetunejobs", "pirate")
    wait_for(
        lambda: (
            not bench.custom.list_namespaced_custom_object(GROUP, VERSION, bench.namespace, "finetunejobs")["items"]
        ),
        "the job to go",
    )
    assert get_object(bench, "adapters", "pirate")["status"]["phase"] == "Ready"


def test_hand_made_peft_folder_is_imported_once_and_ready(
    serving_operator: Operator, bench: Bench, peft_dir: Path
) -> None:
    upload_peft(open_store(bench.bucket_uri), "elsewhere/pirate", peft_dir)
    bench.custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        bench.namespace,
        "adapters",
        adapter_manifest("imported", str(bench.model), bench, uri=f"{bench.bucket_uri}/elsewhere/pirate"),
    )
    status = wait_adapter(bench, "imported", "Ready", "Failed")
    assert status["phase"] == "Ready", status
    assert (status["version"], status["model"], status["rank"]) == ("1", f"{bench.namespace}/imported@1", 4)
    assert "validationLoss" not in status  # nothing measured it
    store = open_store(f"{bench.bucket_uri}/out")
    manifest = read_adapter(store, bench.namespace, "imported", "1").manifest
    assert manifest.importedFrom is not None and manifest.importedFrom["uri"] == f"{bench.bucket_uri}/elsewhere/pirate"
    assert manifest.baseModel.name == str(bench.model)

    # A pass that lost its status (an operator stopped mid-import) finds the version, imports nothing.
    bench.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, bench.namespace, "adapters", "imported", {"status": {"phase": "Pending", "conditions": []}}
    )
    status = wait_adapter(bench, "imported", "Ready", "Failed", timeout=30)
    assert status["version"] == "1" and list_versions(store, bench.namespace, "imported") == ["1"]


def test_corrupt_adapter_fails_with_checksum_mismatch(
    serving_operator: Operator, bench: Bench, peft_dir: Path, s3_env: SeaweedFS
) -> None:
    store = publish_peft(bench, peft_dir, "corrupt")
    weights = bytearray((peft_dir / ADAPTER_WEIGHTS).read_bytes())
    weights[-1] ^= 0xFF  # same size, one bit pattern off: only the checksum can tell
    store.put_bytes(f"{AdapterId(bench.namespace, 'corrupt', '1').store_prefix}/{ADAPTER_WEIGHTS}", bytes(weights))
    bench.custom.create_namespaced_custom_object(
        GROUP, VERSION, bench.namespace, "adapters", adapter_manifest("corrupt", str(bench.model), bench, registry={})
    )
    status = wait_adapter(bench, "corrupt", "Ready", "Failed")
    condition = ready_condition(status)
    assert (status["phase"], condition["status"], condition["reason"]) == ("Failed", "False", "ChecksumMismatch")
    assert ADAPTER_WEIGHTS in condition["message"] and "checksum mismatch" in condition["message"]
    assert "model" not in status and status["version"] == "1"
    assert s3_env.secret_key not in json.dumps(get_object(bench, "adapters", "corrupt"))
    reasons = [e.reason for e in bench.core.list_namespaced_event(bench.namespace).items]
    assert "Failed" in reasons


def test_an_adapter_follows_the_latest_promoted_version_and_shows_promotion(
    kube_cluster: KubeCluster, serving_operator: Operator, bench: Bench, peft_dir: Path
) -> None:
    publish_peft(bench, peft_dir, "gated")  # from before the gate: promoted
    reasons = ["general.nllShift 5.9234 is above maxGeneralNllShift 0.5"]
    publish_peft(bench, peft_dir, "gated", promotion={"promoted": False, "reasons": reasons})
    bench.custom.create_namespaced_custom_object(
        GROUP, VERSION, bench.namespace, "adapters", adapter_manifest("gated", str(bench.model), bench, registry={})
    )
    status = wait_adapter(bench, "gated", "Ready", "Failed")
    assert (status["phase"], status["version"], status["promoted"]) == ("Ready", "1", True)
    pinned = adapter_manifest("gated-two", str(bench.model), bench, registry={"name": "gated", "version": "2"})
    bench.custom.create_namespaced_custom_object(GROUP, VERSION, bench.namespace, "adapters", pinned)
    status = wait_adapter(bench, "gated-two", "Ready", "Failed")
    assert (status["version"], status["promoted"], status["promotionReasons"]) == ("2", False, reasons)
    table = kubectl(kube_cluster, "-n", bench.namespace, "get", "adapters")
    assert "PROMOTED" in table
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    assert "true" in rows["gated"] and "false" in rows["gated-two"]


def test_adapter_for_another_base_model_is_refused(
    serving_operator: Operator, bench: Bench, peft_dir: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other-model"
    other.mkdir()
    config = json.loads((bench.model / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] + 1}))
    store = open_store(f"{bench.bucket_uri}/out")
    base = {"name": str(bench.model), "configSha256": model_config_hash(bench.model)}
    files = {name: peft_dir / name for name in ADAPTER_FILES}
    publish_adapter(store, bench.namespace, "trained", files, {"kind": "lora", "baseModel": base, "metrics": {}})
    upload_peft(open_store(bench.bucket_uri), "elsewhere/peft", peft_dir)
    for manifest in (
        # The manifest's config hash against the base model's, which the operator can read here.
        adapter_manifest("trained", str(other), bench, registry={}),
        # A PEFT folder's base_model_name_or_path against spec.baseModel, by name.
        adapter_manifest(
            "foreign", "HuggingFaceTB/SmolLM2-135M-Instruct", bench, uri=f"{bench.bucket_uri}/elsewhere/peft"
        ),
    ):
        bench.custom.create_namespaced_custom_object(GROUP, VERSION, bench.namespace, "adapters", manifest)
    trained = ready_condition(wait_adapter(bench, "trained", "Ready", "Failed"))
    assert trained["reason"] == "BaseModelMismatch" and "config sha256" in trained["message"], trained
    foreign = ready_condition(wait_adapter(bench, "foreign", "Ready", "Failed"))
    assert foreign["reason"] == "BaseModelMismatch" and "base_model_name_or_path" in foreign["message"], foreign
    assert list_versions(store, bench.namespace, "foreign") == [], "a refused folder must not be imported"


def test_missing_version_and_bad_source_say_what_is_wrong(serving_operator: Operator, bench: Bench) -> None:
    bench.custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        bench.namespace,
        "adapters",
        adapter_manifest("ghost", str(bench.model), bench, registry={"version": "7"}),
    )
    ghost = ready_condition(wait_adapter(bench, "ghost", "Ready", "Failed"))
    assert ghost["reason"] == "NotFound" and "version 7" in ghost["message"], ghost
    assert_no_operator_state(get_object(bench, "adapters", "ghost"))
    empty = f"{bench.bucket_uri}/nothing-{uuid.uuid4().hex[:6]}"
    bench.custom.create_namespaced_custom_object(
        GROUP, VERSION, bench.namespace, "adapters", adapter_manifest("empty", str(bench.model), bench, uri=empty)
    )
    missing = ready_condition(wait_adapter(bench, "empty", "Ready", "Failed"))
    assert missing["reason"] == "NotFound" and "adapter_config.json" in missing["message"], missing
    # The schema refuses both sources at once (and neither), before the operator sees it.
    both = adapter_manifest("both", str(bench.model), bench, registry={}, uri=empty)
    with pytest.raises(k8s.ApiException) as refused:
        bench.custom.create_namespaced_custom_object(GROUP, VERSION, bench.namespace, "adapters", both)
    assert refused.value.status == 422
