"""cluster/ray: the KubeRay RayJob and the `ray up` cluster config."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray.autoscaler
import yaml
from cluster_testlib import CLUSTER, IMAGE, REPO, load_docs
from ray.autoscaler._private.util import prepare_config, validate_config

from core.config import load_config
from pipeline.config import PrepConfig
from pipeline.prep import parse_args as prep_parse_args

RAYJOB = CLUSTER / "ray" / "rayjob.yaml"
CLUSTER_YAML = CLUSTER / "ray" / "cluster.yaml"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


def _rayjob() -> dict:
    [doc] = load_docs(RAYJOB)
    return doc


def _groups(job: dict) -> dict[str, dict]:
    spec = job["spec"]["rayClusterSpec"]
    return {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}


def test_rayjob_required_fields() -> None:
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert {"rayStartParams", "template"} <= set(cluster["headGroupSpec"])
    for group in cluster["workerGroupSpecs"]:
        assert {"groupName", "replicas", "rayStartParams", "template"} <= set(group)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    # KubeRay's CRD types rayStartParams as map[string]string.
    for group in _groups(job).values():
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]


def test_rayjob_entrypoint_runs_the_prep_pipeline() -> None:
    argv = shlex.split(_rayjob()["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "pipeline.prep"]
    for flag in ("--videos", "--images", "--out", "--config"):
        assert argv.index(flag) + 1 < len(argv) and not argv[argv.index(flag) + 1].startswith("--")
    # The driver's working directory is not ours to choose: the config path must be absolute.
    args = prep_parse_args(argv[3:])  # pipeline.prep's own parser
    assert args.config == "/opt/higen/configs/prep/default.yaml"
    assert args.videos.startswith("s3://") and args.images.startswith("s3://") and args.out.startswith("s3://")
    # The config file (at its place in the image) and any overrides must load.
    load_config(PrepConfig, REPO / args.config.removeprefix("/opt/higen/"), args.overrides)


def test_rayjob_has_cpu_and_gpu_workers_on_the_image() -> None:
    groups = _groups(_rayjob())
    assert set(groups) == {"head", "cpu", "gpu"}

    def gpus(group: dict) -> int:
        container = group["template"]["spec"]["containers"][0]
        return int(container["resources"].get("limits", {}).get("nvidia.com/gpu", 0))

    assert gpus(groups["gpu"]) >= 1
    assert gpus(groups["gpu"]) == int(groups["gpu"]["template"]["spec"]["containers"][0]
                                     ["resources"]["requests"]["nvidia.com/gpu"])
    assert gpus(groups["cpu"]) == 0 and gpus(groups["head"]) == 0
    for group in groups.values():
        assert group["template"]["spec"]["containers"][0]["image"] == IMAGE


@pytest.mark.parametrize("group", ["head", "cpu", "gpu"])
def test_rayjob_pod_templates_match_kubernetes_schema(group: str) -> None:
    """The CRD embeds core PodTemplateSpecs: check them with the Kubernetes schema."""
    template = _groups(_rayjob())[group]["template"]
    wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template}
    kubernetes_validate.validate(wrapper, kubernetes_validate.latest_version(), strict=True)


def test_ray_version_matches_the_image() -> None:
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    [pinned] = re.findall(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.MULTILINE)
    assert _rayjob()["spec"]["rayClusterSpec"]["rayVersion"] == pinned


def _cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_matches_rays_schema() -> None:
    config = _cluster_config()
    jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))
    # What `ray up` itself does before it touches the cloud: fill defaults, validate.
    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_schema_check_can_fail() -> None:
    config = _cluster_config()
    config["available_node_types"]["gpu"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


def test_cluster_yaml_nodes() -> None:
    config = _cluster_config()
    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"] == IMAGE
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu = [name for name, t in workers.items() if t["resources"].get("GPU", 0) >= 1]
    cpu = [name for name, t in workers.items() if t["resources"].get("GPU", 0) == 0]
    assert gpu and cpu
    assert all(t["min_workers"] <= t["max_workers"] <= config["max_workers"] for t in workers.values())
    assert any("--head" in cmd for cmd in config["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in cmd for cmd in config["worker_start_ray_commands"])
