"""cluster/hostfile.py: SLURM node lists -> DeepSpeed hostfiles."""

from __future__ import annotations

import subprocess
import sys

import pytest
from cluster_testlib import REPO
from deepspeed.launcher.runner import fetch_hostfile

from cluster.hostfile import expand_nodelist, hostfile_text, parse_slots, pod_hosts, write_hostfile


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("node7", ["node7"]),
        ("a[1-2],b3", ["a1", "a2", "b3"]),
        ("gpu-a[1-2]-b[3-4]", ["gpu-a1-b3", "gpu-a1-b4", "gpu-a2-b3", "gpu-a2-b4"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[1,3-4]x,m[05-06]", ["n1x", "n3x", "n4x", "m05", "m06"]),
        ("dgx[1-2].cluster.local", ["dgx1.cluster.local", "dgx2.cluster.local"]),
        ("rack1-[0-1]", ["rack1-0", "rack1-1"]),
        ("node01,node02", ["node01", "node02"]),  # scontrol's output joined with commas
        ("node01\nnode02\n", ["node01", "node02"]),  # ... or as it prints it
        ("  x[1-1]  ", ["x1"]),
    ],
)
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    "nodelist, message",
    [
        ("", "names no hosts"),
        ("node[1-2", "never closed"),
        ("node1-2]", "without a matching"),
        ("node[[1-2]]", "nested"),
        ("node[3-1]", "runs backwards"),
        ("node[a-b]", "bad range"),
        ("node[1-2-3]", "bad range"),
        ("node[]", "bad range"),
        ("node[1,,2]", "bad range"),
        ("node[ 1]", "bad range"),
        ("bad#host", "not a valid host name"),
        ("slots=8", "not a valid host name"),
    ],
)
def test_expand_nodelist_rejects(nodelist: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        expand_nodelist(nodelist)


def test_pod_hosts() -> None:
    assert pod_hosts(3, "job-{}.svc") == ["job-0.svc", "job-1.svc", "job-2.svc"]
    with pytest.raises(ValueError, match="at least 1"):
        pod_hosts(0, "job-{}")
    with pytest.raises(ValueError, match="needs a"):
        pod_hosts(2, "job")


@pytest.mark.parametrize("value, slots", [("8", 8), (4, 4), ("h100:8", 8), ("gpu:h100:4", 4), ("8(x2)", 8)])
def test_parse_slots(value: str | int, slots: int) -> None:
    assert parse_slots(value) == slots


@pytest.mark.parametrize("value, message", [("0", "not a GPU count"), ("x", "not a GPU count"),
                                            ("", "not a GPU count"), ("8(x2),4", "differ between nodes")])
def test_parse_slots_rejects(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_slots(value)


def test_write_hostfile_is_what_deepspeed_reads(tmp_path) -> None:
    nodes = expand_nodelist("node[01-03,07]")
    path = write_hostfile(nodes, 8, tmp_path / "sub" / "hostfile")
    assert path.read_text() == "node01 slots=8\nnode02 slots=8\nnode03 slots=8\nnode07 slots=8\n"
    # DeepSpeed's own parser: same hosts, same order, same slots.
    assert list(fetch_hostfile(str(path)).items()) == [(n, 8) for n in nodes]


def test_hostfile_rejects_duplicates_and_bad_slots() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        hostfile_text(["a1", "a2", "a1"], 8)
    with pytest.raises(ValueError, match="at least 1"):
        hostfile_text(["a1"], 0)
    with pytest.raises(ValueError, match="at least one host"):
        hostfile_text([], 8)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.hostfile", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_cli_writes_hostfile(tmp_path) -> None:
    out = tmp_path / "hostfile"
    result = _cli("--nodelist", "gpu[1-2]", "--slots", "h100:4", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_text() == "gpu1 slots=4\ngpu2 slots=4\n"


def test_cli_replicas_to_stdout() -> None:
    result = _cli("--replicas", "2", "--host-format", "job-{}.svc", "--slots", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "job-0.svc slots=8\njob-1.svc slots=8\n"


def test_cli_reports_bad_nodelist(tmp_path) -> None:
    out = tmp_path / "hostfile"
    result = _cli("--nodelist", "node[5-1]", "--slots", "8", "--out", str(out))
    assert result.returncode == 2
    assert "runs backwards" in result.stderr
    assert not out.exists()
