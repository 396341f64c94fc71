"""cluster/k8s/train.yaml: valid Kubernetes objects whose pods start a correct DeepSpeed run."""

from __future__ import annotations

import copy
import subprocess

import kubernetes_validate
import pytest
from cluster_testlib import (
    CLUSTER,
    IMAGE,
    REPO,
    SHELLCHECK,
    deepspeed_lines,
    expand_k8s_refs,
    fake_bin,
    load_docs,
    run,
    script_env,
)
from deepspeed.launcher.runner import fetch_hostfile, parse_args

from training.train import parse_args as train_parse_args

MANIFEST = CLUSTER / "k8s" / "train.yaml"
# The oldest release whose Job API has everything used (podFailurePolicy GA in 1.31) and the
# newest schema kubernetes-validate ships.
K8S_VERSIONS = ["1.31.0", kubernetes_validate.latest_version()]


def _objects() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in load_docs(MANIFEST)}


def _container() -> dict:
    return _objects()["Job"]["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifest_matches_kubernetes_schema(version: str) -> None:
    docs = load_docs(MANIFEST)
    assert sorted(doc["kind"] for doc in docs) == ["Job", "PersistentVolumeClaim", "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_schema_check_can_fail() -> None:
    job = copy.deepcopy(_objects()["Job"])
    job["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # typo of "resources"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSIONS[-1], strict=True)


def test_job_service_and_env_agree() -> None:
    objs = _objects()
    job, service = objs["Job"], objs["Service"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in _container()["env"]}
    name = job["metadata"]["name"]

    assert spec["completionMode"] == "Indexed"
    assert int(env["NNODES"]) == spec["completions"] == spec["parallelism"]
    limits = _container()["resources"]["limits"]
    assert int(env["GPUS_PER_NODE"]) == int(limits["nvidia.com/gpu"])
    # Pod 0's DNS name: <job>-0.<subdomain>, served by the headless Service of that name.
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    assert env["MASTER_ADDR"] == f"{name}-0.{pod['subdomain']}"
    assert int(env["MASTER_PORT"]) in [p["port"] for p in service["spec"]["ports"]]
    # Shared checkpoints on the claimed RWX volume.
    claim = objs["PersistentVolumeClaim"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in _container()["volumeMounts"]}
    assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert env["HIGEN_OUTPUT"].startswith(mounts["checkpoints"] + "/")
    assert _container()["image"] == IMAGE
    index = next(e for e in _container()["env"] if e["name"] == "JOB_COMPLETION_INDEX")
    assert "job-completion-index" in index["valueFrom"]["fieldRef"]["fieldPath"]


def _pod_script(env: dict[str, str]) -> list[str]:
    container = _container()
    assert container["command"] == ["bash", "-c"]
    return ["bash", "-c", *(expand_k8s_refs(arg, env) for arg in container["args"])]


def test_pod_script_passes_shellcheck(tmp_path) -> None:
    script = tmp_path / "pod.sh"
    script.write_text("#!/usr/bin/env bash\n" + _container()["args"][0])
    result = subprocess.run([str(SHELLCHECK), str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("index", [0, 1])
def test_pod_starts_deepspeed_for_its_index(tmp_path, index: int) -> None:
    """Run each pod's start-up script as Kubernetes would, with deepspeed in dry-run mode."""
    env = {e["name"]: e["value"] for e in _container()["env"] if "value" in e}
    env["JOB_COMPLETION_INDEX"] = str(index)  # what the fieldRef resolves to
    env["HOSTFILE"] = str(tmp_path / "hostfile")
    env["HIGEN_DRY_RUN"] = "1"
    fake = fake_bin(tmp_path / "bin", {"getent": 'echo "10.0.0.1 $2"\n'})
    result = run(_pod_script(env), script_env(env, fake))
    assert result.returncode == 0, result.stderr

    [argv] = deepspeed_lines(result.stdout)
    args = parse_args(argv)
    assert args.no_ssh and args.node_rank == index
    assert args.master_addr == "higen-train-0.higen-train"
    assert args.master_port == 29500
    assert list(fetch_hostfile(args.hostfile).items()) == [
        ("higen-train-0.higen-train", 8),
        ("higen-train-1.higen-train", 8),
    ]
    assert args.user_script == "training/train.py"
    train = train_parse_args(args.user_args)
    assert train.resume == "auto"
    assert train.output == "/checkpoints/higen"
    assert train.data == env["HIGEN_DATA"]
    assert (REPO / train.config).is_file()
