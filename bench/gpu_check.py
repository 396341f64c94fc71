"""The prepared device check (issue 17): the five measurements of `bench/gpu_sections.py`, each
in its own process with its own time limit, one Markdown table and one JSON file.

    python bench/gpu_check.py [--out bench/results] [--sections encoders,prep,...] [--cpu-rehearsal]

`--cpu-rehearsal` runs every code path at tiny sizes on the CPU (CPU actors, gloo), so the
script is known to work before device time is spent on it. Figures from a rehearsal are not
GPU figures and the report says so.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

# section -> seconds it may take on one H100/H200 (8 minutes in all, with start-up)
BUDGET_S = {"encoders": 60, "prep": 140, "nvdec_path": 30, "unet": 80, "image": 40, "zero2": 100}
REHEARSAL_BUDGET_S = {"encoders": 120, "prep": 400, "nvdec_path": 120, "unet": 120, "image": 60, "zero2": 300}


def ffmpeg_env() -> None:
    """Re-exec once with LD_LIBRARY_PATH naming an FFmpeg torchcodec can load (read at exec)."""
    from preprocessing.backends import child_env

    env = child_env("torchcodec", dict(os.environ))
    changed = env.get("LD_LIBRARY_PATH") != os.environ.get("LD_LIBRARY_PATH")
    if changed and "HIGEN_FFMPEG_ENV" not in os.environ:
        env["HIGEN_FFMPEG_ENV"] = "1"
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def run_section(name: str, rehearsal: bool, workdir: Path) -> dict:
    import gpu_sections as g
    import torch

    sizes = g.Sizes.pick(rehearsal)
    if not rehearsal and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu-rehearsal, or on a GPU machine")
    if name == "prep":
        decoders = ["decord", "torchcodec"] + ([] if rehearsal else ["nvdec"])
        return g.prep(sizes, workdir / "prep", decoders)
    if name == "nvdec_path":
        return g.nvdec_path(sizes, workdir / "prep")
    if name == "zero2":
        return g.zero2(sizes, workdir / "zero2")
    return getattr(g, name)(sizes)


def device_name(rehearsal: bool) -> str:
    import torch

    if not rehearsal and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"CPU rehearsal, {os.cpu_count()} cores (torch {torch.__version__}); NOT GPU figures"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return str(v).replace("|", "/").replace("\n", " ")


def markdown(report: dict) -> str:
    lines = [f"# GPU check {report['date']}", "", f"Device: {report['device']}", "",
             "Sections run in their own processes; times after one warm-up. FLOP fractions and MFU "
             "use the datasheet bf16 peak (H100/H200 989 TFLOP/s; an 8192^3 bf16 matmul measured "
             "~790 TFLOP/s on the H200 here).", ""]
    for name, sec in report["sections"].items():
        lines += [f"## {name} ({sec.get('seconds', 0):.0f} s)", ""]
        if "error" in sec:
            lines += [f"error: {_fmt(sec['error'])}", ""]
            continue
        rows = sec.get("rows") or []
        cols = [c for c in dict.fromkeys(k for r in rows for k in r) if c != "tail"]
        if rows:
            lines += ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
            lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
        for r in rows:
            if "tail" in r:
                lines += ["", "```", r["tail"][-800:], "```"]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--sections", default=",".join(BUDGET_S))
    p.add_argument("--cpu-rehearsal", action="store_true")
    p.add_argument("--workdir", default=None)
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)  # child: run one, print JSON
    args = p.parse_args()
    ffmpeg_env()
    workdir = Path(args.workdir or f"/tmp/higen-gpu-check-{os.getpid()}")
    if args.section:
        print("RESULT " + json.dumps(run_section(args.section, args.cpu_rehearsal, workdir)))
        return 0
    budgets = REHEARSAL_BUDGET_S if args.cpu_rehearsal else BUDGET_S
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d-%H%M")
    report = dict(date=stamp, device=device_name(args.cpu_rehearsal), rehearsal=args.cpu_rehearsal,
                  sections={})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / (f"gpu-{stamp}" + ("-cpu-rehearsal" if args.cpu_rehearsal else ""))
    for name in args.sections.split(","):
        cmd = [sys.executable, __file__, "--section", name, "--workdir", str(workdir)]
        cmd += ["--cpu-rehearsal"] if args.cpu_rehearsal else []
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=budgets[name])
            found = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            sec = json.loads(found[-1][7:]) if found else {"error": f"exit {done.returncode}: "
                                                                    f"{(done.stdout + done.stderr)[-600:]}"}
        except subprocess.TimeoutExpired:
            sec = {"error": f"over its {budgets[name]} s budget"}
        sec["seconds"] = time.perf_counter() - start
        report["sections"][name] = sec
        flag = " ERROR" if "error" in sec else ""
        print(f"{name}: {sec['seconds']:.0f} s{flag}", file=sys.stderr, flush=True)
        # after every section: a run stopped by the outer time limit still leaves its tables
        base.with_suffix(".json").write_text(json.dumps(report, indent=1))
        base.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 1 if any("error" in s for s in report["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
