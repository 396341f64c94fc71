"""DeepSpeed hostfiles from SLURM node lists or Kubernetes replica counts.

    python -m cluster.hostfile --nodelist "$SLURM_JOB_NODELIST" --slots 8 --out hostfile
    python -m cluster.hostfile --replicas 4 --host-format "job-{}.svc" --slots 8 --out hostfile

Standard library only: it runs on SLURM batch hosts outside the training image. The SLURM
script prefers `scontrol show hostnames` (it knows every site's syntax) and passes its expanded
list here; `expand_nodelist` is the fallback and covers SLURM's hostlist syntax: comma or
whitespace separated items, each item literal text with any number of `[...]` groups of
numbers and ranges (`node[01-03,07]`, `a[1-2]-b[3-4]`), zero padding taken from the range
start. Several groups in one item expand as a product, the first group outermost, as SLURM
does.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from pathlib import Path

# Hostfile lines are `host slots=N`: a name with whitespace, `#` or `=` would corrupt them.
_HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_RANGE_RE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_items(nodelist: str) -> list[str]:
    """Split at commas and whitespace that are outside brackets."""
    items, current, depth = [], [], 0
    for ch in nodelist:
        if ch == "[":
            if depth:
                raise ValueError(f"node list {nodelist!r}: nested '[' is not SLURM hostlist syntax")
            depth = 1
        elif ch == "]":
            if not depth:
                raise ValueError(f"node list {nodelist!r}: ']' without a matching '['")
            depth = 0
        elif depth == 0 and (ch == "," or ch.isspace()):
            items.append("".join(current))
            current = []
            continue
        current.append(ch)
    if depth:
        raise ValueError(f"node list {nodelist!r}: '[' is never closed")
    items.append("".join(current))
    return [item for item in items if item]


def _expand_group(group: str, item: str) -> list[str]:
    """`01-03,07` -> ['01', '02', '03', '07'], keeping the width of each range's start."""
    values = []
    for part in group.split(","):
        match = _RANGE_RE.match(part)
        if not match:
            raise ValueError(f"node list item {item!r}: bad range {part!r} in [{group}]; use N or N-M")
        start, end = match.group(1), match.group(2) or match.group(1)
        if int(end) < int(start):
            raise ValueError(f"node list item {item!r}: range {part!r} runs backwards")
        width = len(start)
        values.extend(f"{i:0{width}d}" for i in range(int(start), int(end) + 1))
    return values


def _expand_item(item: str) -> list[str]:
    # re.split with a capture group alternates literal text and bracket contents.
    pieces = re.split(r"\[([^\]]*)\]", item)
    choices = [[piece] if i % 2 == 0 else _expand_group(piece, item) for i, piece in enumerate(pieces)]
    hosts = ["".join(parts) for parts in itertools.product(*choices)]
    for host in hosts:
        if not _HOST_RE.match(host):
            raise ValueError(f"node list item {item!r} gives {host!r}, which is not a valid host name")
    return hosts


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist expression, e.g. `node[01-03,07]` -> node01 node02 node03 node07."""
    hosts = [host for item in _split_items(nodelist.strip()) for host in _expand_item(item)]
    if not hosts:
        raise ValueError(f"node list {nodelist!r} names no hosts")
    return hosts


def pod_hosts(replicas: int, host_format: str) -> list[str]:
    """Hosts of an Indexed Job's pods: `host_format` with `{}` replaced by 0..replicas-1."""
    if replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {replicas}")
    if "{}" not in host_format:
        raise ValueError(f"--host-format {host_format!r} needs a '{{}}' where the pod index goes")
    return [host_format.replace("{}", str(i)) for i in range(replicas)]


def parse_slots(value: str | int) -> int:
    """GPUs per node from a plain count or SLURM's forms: `8`, `h100:8`, `gpu:h100:8`, `8(x2)`."""
    text = str(value).strip()
    if "," in text:
        raise ValueError(
            f"slots {text!r} differ between nodes; DeepSpeed needs one count per node here, "
            "pass --slots N (or HIGEN_GPUS_PER_NODE=N)"
        )
    match = re.match(r"^(?:[A-Za-z0-9_-]+:)*(\d+)(?:\(x\d+\))?$", text)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"slots {text!r} is not a GPU count; pass a positive integer such as 8")
    return int(match.group(1))


def hostfile_text(nodes: list[str], slots: int) -> str:
    """DeepSpeed's hostfile format: one `host slots=N` line per node."""
    if not nodes:
        raise ValueError("a hostfile needs at least one host")
    if slots < 1:
        raise ValueError(f"slots must be at least 1, got {slots}")
    seen = set()
    for node in nodes:
        if not _HOST_RE.match(node):
            raise ValueError(f"{node!r} is not a valid host name")
        if node in seen:
            raise ValueError(f"host {node!r} is listed twice; DeepSpeed rejects duplicate hostfile entries")
        seen.add(node)
    return "".join(f"{node} slots={slots}\n" for node in nodes)


def write_hostfile(nodes: list[str], slots: int, path: str | Path) -> Path:
    """Write `nodes` with `slots` GPUs each to `path` in DeepSpeed's hostfile format."""
    path = Path(path)
    text = hostfile_text(nodes, slots)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.hostfile", description=__doc__.split("\n\n")[0])
    hosts = parser.add_mutually_exclusive_group(required=True)
    hosts.add_argument("--nodelist", help="SLURM hostlist, e.g. \"$SLURM_JOB_NODELIST\" or scontrol's output")
    hosts.add_argument("--replicas", type=int, help="number of pods (Kubernetes Indexed Job completions)")
    parser.add_argument("--host-format", default="{}", help="pod host name with {} for the index")
    parser.add_argument("--slots", required=True, help="GPUs per node: 8, or SLURM's h100:8 / 8(x2)")
    parser.add_argument("--out", default="-", help="hostfile path, '-' for stdout")
    args = parser.parse_args(argv)
    try:
        nodes = expand_nodelist(args.nodelist) if args.nodelist is not None else pod_hosts(
            args.replicas, args.host_format
        )
        slots = parse_slots(args.slots)
        if args.out == "-":
            sys.stdout.write(hostfile_text(nodes, slots))
        else:
            write_hostfile(nodes, slots, args.out)
    except ValueError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
