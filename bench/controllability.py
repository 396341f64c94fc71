"""Do γm and γa do what they say? End to end on the synthetic corpus (known speeds and
background drift), CPU only:

    python bench/controllability.py [--work bench/out/controllability] [--videos 48]
        [--max-steps N] [--reuse] [--seeds 3]

1. corpus (`preprocessing.synthetic`), a small trained VAE (`preprocessing.tiny_vae`), prep
   with `configs/prep/tiny.yaml` and `models.vae=VAE`, then training exactly as the contract
   runs it: `python training/train.py --config configs/train/control.yaml --data D --output R`
   (`--max-steps` only for a shorter run, as the demo does);
2. one prompt sampled at 5 γm levels spanning the training data's 10th-90th percentiles (γa at
   the data's median) and at 5 γa levels in [0, 1] (γm at the median), each with the same
   `--seeds` seeds; every seed has its own reference picture as spatial prior (image-to-video,
   SPEC §6: the single-process recipe has no image ranks to train stage 1);
3. measured: the motion of the sampled latents (10 x the mean raw motion factor, γm units) and
   the appearance change of the decoded frames under the prep's semantic model
   (1 - A[0, F-1], also in γa units: change / the data's 99th percentile).

Targets (issue 13): Spearman ρ >= 0.9 between requested and measured γm over the level means,
top level >= 2x the bottom one; ρ >= 0.8 for γa; a falling loss curve (`loss.png`); a 3 γm x
3 γa grid of frames (`grid.png`, Fig. 2 style). Prints the table; writes `results.json`,
`results.md` next to the PNGs under --work. Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PROMPT = "a red square moving to the right on a blue background"
RED, BLUE = (220, 40, 40), (40, 80, 220)  # preprocessing.synthetic's colours of the prompt's words
GRID_FRAMES = (0, 3, 5, 7)


def run_cmd(cmd: list[str], log: Path) -> float:
    """Run a stage as its user would (a subprocess), output to `log`; returns seconds."""
    t0 = time.perf_counter()
    # One intra-op thread unless told otherwise: on shared, oversubscribed cores torch's default
    # (a thread per core) made a control.yaml step ~10x slower (measured ~20 s vs ~1.5 s, noisy).
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    with log.open("w") as fh:
        done = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        sys.exit(f"stage failed ({done.returncode}): {' '.join(cmd)}\n--- {log}:\n{log.read_text()[-4000:]}")
    return time.perf_counter() - t0


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's ρ: Pearson correlation of ranks (ties get their average rank)."""
    def ranks(v):
        v = np.asarray(v, dtype=np.float64)
        order = v.argsort()
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):
            r[v == value] = r[v == value].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def reference_frame(seed: int, width: int, height: int) -> np.ndarray:
    """uint8 [H,W,3]: the prompt's red square on a blue ramp background (synthetic.py's look),
    at a seed-dependent place."""
    rng = np.random.default_rng(1000 + seed)
    ramp = np.linspace(0.75, 1.0, width, dtype=np.float32)[None, :, None]
    frame = np.broadcast_to(np.array(BLUE, np.float32) * ramp, (height, width, 3)).copy()
    side = max(8, min(width, height) // 5)
    x, y = int(rng.uniform(0, width - side)), int(rng.uniform(0, height - side))
    frame[y : y + side, x : x + side] = RED
    return frame.astype(np.uint8)


def build(args: argparse.Namespace, work: Path) -> dict[str, float]:
    """Stages 1-4 (corpus, VAE, prep, training); each is skipped under --reuse once done."""
    py, times = sys.executable, {}
    raw, vae, shards, run = paths(args, work)
    if args.shards:  # an existing prep output (the demo's): nothing to build before training
        pass
    elif not (args.reuse and (raw / "truth.json").is_file()):
        from preprocessing.synthetic import generate

        t0 = time.perf_counter()
        generate(raw, videos=args.videos, images=args.images, seed=args.seed, seconds=args.seconds)
        times["corpus"] = time.perf_counter() - t0
    if not args.vae and not (args.reuse and (vae / "config.json").is_file()):
        cmd = [py, "-m", "preprocessing.tiny_vae", "--data", str(raw), "--out", str(vae)]
        times["tiny_vae"] = run_cmd(cmd, work / "tiny_vae.log")
    if not args.shards and not (args.reuse and (shards / "dataset.json").is_file()):
        cmd = [py, "-m", "pipeline.prep", "--config", "configs/prep/tiny.yaml", "--videos",
               str(raw / "videos.parquet"), "--images", str(raw / "images.parquet"), "--out", str(shards),
               "--overwrite", f"models.vae={vae}"]
        times["prep"] = run_cmd(cmd, work / "prep.log")
    if not (args.reuse and (run / "checkpoints" / "latest").exists()):
        cmd = [py, "training/train.py", "--config", "configs/train/control.yaml", "--data", str(shards),
               "--output", str(run)]
        if args.max_steps:
            cmd += ["--max-steps", str(args.max_steps)]
        if run.exists() and not args.reuse:
            import shutil

            shutil.rmtree(run)
        times["train"] = run_cmd(cmd, work / "train.log")
    if "train" in times or not (run / "export" / "unet.safetensors").is_file():
        # a safetensors export of our own run (made once, trusted): sampling then unpickles nothing
        cmd = [py, "-m", "training.export", "--ckpt", str(run), "--out", str(run / "export"),
               "--trust-checkpoint"]
        times["export"] = run_cmd(cmd, work / "export.log")
    return times


def paths(args: argparse.Namespace, work: Path) -> tuple[Path, Path, Path, Path]:
    """(corpus, VAE, shards, run): under --work unless --vae / --shards name existing ones."""
    return (work / "raw", Path(args.vae) if args.vae else work / "vae",
            Path(args.shards) if args.shards else work / "shards", work / "run")


class Probe:
    """The trained model, its VAE and the prep's semantic model; samples and measures."""

    def __init__(self, vae: Path, shards: Path, run: Path, steps: int | None):
        import torch

        from core.semantic import SemanticModel
        from model.checkpoint_io import load_for_sampling
        from model.sample_config import SampleConfig
        from model.sampler import Sampler

        torch.manual_seed(0)
        bundle = load_for_sampling(run / "export")
        cfg = SampleConfig(vae=str(vae), steps=steps, device="cpu", dtype="fp32")
        self.sampler = Sampler(bundle, cfg, log=lambda msg: print(msg, file=sys.stderr))
        self.stats = bundle.statistics
        if self.stats is None:
            sys.exit("the trained checkpoint carries no data statistics: this benchmark needs a current prep")
        # the semantic model that measured the training clips (dataset.json: the prep config)
        models = json.loads((shards / "dataset.json").read_text())["config"]["models"]
        self.semantic = SemanticModel(models["semantic"], models.get("semantic_checkpoint"))
        self.a, self.b = bundle.unet_cfg.appearance_a, bundle.unet_cfg.appearance_b

    def in_gamma_a_units(self, change: float) -> float:
        """A measured appearance change in γa units (model/calibration.py): 1 - a - b + a·c."""
        return 1.0 - self.a - self.b + self.a * change

    def priors(self, seeds: list[int]):
        import torch

        s = self.sampler
        frames = [reference_frame(seed, s.width, s.height) for seed in seeds]
        x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return torch.cat([s.image_prior(img) for img in x])

    def sample(self, prior, gm: float, ga: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(latents [B,4,F,h,w], uint8 frames [B,F,H,W,3]) for one setting, one video per prior."""
        latents, _ = self.sampler.generate([PROMPT] * len(prior), seed, prior=prior, motion_factor=gm,
                                           appearance_factor=ga)
        return latents.float().cpu().numpy(), self.sampler.decode(latents)

    def measure(self, latents: np.ndarray, frames: np.ndarray) -> tuple[list[float], list[float]]:
        """Per video: (γm measured: 10 x mean ||z[f+1]-z[f]||, appearance change 1 - A[0,F-1])."""
        import torch

        from core.statistics import MOTION_UNITS
        from preprocessing.factors import appearance_factor, appearance_matrix, motion_factors

        motion = [float(MOTION_UNITS * motion_factors(z.transpose(1, 0, 2, 3)).mean()) for z in latents]
        change = [appearance_factor(appearance_matrix(self.semantic(torch.from_numpy(f)).numpy()))
                  for f in frames]
        return motion, change


def sweep(probe: Probe, seeds: list[int]) -> tuple[list[dict], dict]:
    st = probe.stats
    gm_mid = st.motion["p50"]
    ga_mid = float(np.clip(probe.in_gamma_a_units(st.appearance_change["p50"]), 0.0, 1.0))
    prior = probe.priors(seeds)
    rows, grid = [], {}
    levels = [("motion", float(g), ga_mid) for g in np.linspace(st.motion["p10"], st.motion["p90"], 5)]
    levels += [("appearance", gm_mid, float(g)) for g in np.linspace(0.0, 1.0, 5)]
    for sweep_name, gm, ga in levels:
        latents, frames = probe.sample(prior, gm, ga, seed=seeds[0])
        motion, change = probe.measure(latents, frames)
        rows.append({"sweep": sweep_name, "gamma_m": gm, "gamma_a": ga,
                     "measured_gamma_m": float(np.mean(motion)), "measured_gamma_m_sd": float(np.std(motion)),
                     "appearance_change": float(np.mean(change)),
                     "measured_gamma_a": probe.in_gamma_a_units(float(np.mean(change))),
                     "per_seed_motion": motion, "per_seed_change": change})
        print(f"  {sweep_name:10s} γm={gm:7.2f} γa={ga:4.2f} -> measured γm {np.mean(motion):7.2f} "
              f"appearance change {np.mean(change):.4f}", flush=True)
    for gm in (st.motion["p10"], st.motion["p50"], st.motion["p90"]):
        for ga in (0.0, 0.5, 1.0):
            grid[(gm, ga)] = probe.sample(prior[:1], gm, ga, seed=seeds[0])[1][0]
    return rows, grid


def save_grid(grid: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gms, gas = sorted({k[0] for k in grid}), sorted({k[1] for k in grid})
    fig, axes = plt.subplots(len(gms), len(gas), figsize=(5.2 * len(gas), 1.1 * len(gms) + 0.8))
    for i, gm in enumerate(gms):
        for j, ga in enumerate(gas):
            frames = grid[(gm, ga)]
            strip = np.concatenate([np.pad(frames[f], ((0, 0), (0, 2), (0, 0)), constant_values=255)
                                    for f in GRID_FRAMES if f < len(frames)], axis=1)
            ax = axes[i][j]
            ax.imshow(strip, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"γa = {ga:g}")
            if j == 0:
                ax.set_ylabel(f"γm = {gm:.3g}")
    fig.suptitle(f"\"{PROMPT}\": frames {', '.join(map(str, GRID_FRAMES))} per cell")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_loss(run: Path, path: Path) -> dict[str, float]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss_video"] for r in rows], dtype=np.float64)
    window = max(1, len(loss) // 20)
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    tenth = max(1, len(loss) // 10)
    first, last = float(loss[:tenth].mean()), float(loss[-tenth:].mean())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss, alpha=0.3, lw=0.8, label="loss (video ranks)")
    ax.plot(steps[window - 1 :], smooth, lw=2, label=f"moving mean ({window} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("v-prediction MSE")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("configs/train/control.yaml on the synthetic corpus")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"steps": int(steps[-1]), "first_tenth_mean": first, "last_tenth_mean": last,
            "falls": last < 0.8 * first}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(REPO / "bench" / "out" / "controllability"))
    p.add_argument("--videos", type=int, default=48, help="synthetic videos (4 speeds x 3 drifts, cycled)")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0, help="corpus seed")
    p.add_argument("--seeds", type=int, default=3, help="sampling seeds per level")
    p.add_argument("--steps", type=int, help="denoising steps (default: the checkpoint's)")
    p.add_argument("--max-steps", type=int, help="train fewer steps than control.yaml says (demo)")
    p.add_argument("--reuse", action="store_true", help="keep finished stages of an earlier run in --work")
    p.add_argument("--vae", help="use this trained VAE (a preprocessing.tiny_vae output), train none")
    p.add_argument("--shards", help="use this configs/prep/tiny.yaml output (made with --vae), no prep")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    times = build(args, work)
    t0 = time.perf_counter()
    _, vae, shards, run = paths(args, work)
    probe = Probe(vae, shards, run, args.steps)
    rows, grid = sweep(probe, list(range(args.seeds)))
    times["sample_and_measure"] = time.perf_counter() - t0
    save_grid(grid, work / "grid.png")
    loss = save_loss(run, work / "loss.png")
    motion = [r for r in rows if r["sweep"] == "motion"]
    appear = [r for r in rows if r["sweep"] == "appearance"]
    rho_m = spearman([r["gamma_m"] for r in motion], [r["measured_gamma_m"] for r in motion])
    rho_a = spearman([r["gamma_a"] for r in appear], [r["appearance_change"] for r in appear])
    ratio = motion[-1]["measured_gamma_m"] / max(motion[0]["measured_gamma_m"], 1e-9)
    checks = {"rho_m": rho_m >= 0.9, "ratio": ratio >= 2.0, "rho_a": rho_a >= 0.8, "loss": loss["falls"]}
    lines = ["| sweep | γm requested | γa requested | γm measured (mean ± sd over seeds) | "
             "appearance change measured | γa measured |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['sweep']} | {r['gamma_m']:.2f} | {r['gamma_a']:.2f} | {r['measured_gamma_m']:.2f} ± "
              f"{r['measured_gamma_m_sd']:.2f} | {r['appearance_change']:.4f} | {r['measured_gamma_a']:.3f} |"
              for r in rows]
    st = probe.stats
    lines += ["", f"training data: {st.clips} clips, γm p10/p50/p90 = {st.motion['p10']:.2f}/"
              f"{st.motion['p50']:.2f}/{st.motion['p90']:.2f}, appearance change p50/p99 = "
              f"{st.appearance_change['p50']:.4f}/{st.appearance_change['p99']:.4f}",
              f"loss: first tenth {loss['first_tenth_mean']:.4f} -> last tenth {loss['last_tenth_mean']:.4f} "
              f"over {loss['steps']} steps", "",
              "| target | value | met |", "|---|---|---|",
              f"| Spearman ρ(γm requested, measured) >= 0.9 | {rho_m:.3f} | {checks['rho_m']} |",
              f"| measured γm top / bottom level >= 2 | {ratio:.2f} | {checks['ratio']} |",
              f"| Spearman ρ(γa requested, appearance change) >= 0.8 | {rho_a:.3f} | {checks['rho_a']} |",
              f"| loss falls (last tenth / first tenth < 0.8) | "
              f"{loss['last_tenth_mean'] / loss['first_tenth_mean']:.2f} | {checks['loss']} |",
              "", "seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())]
    table = "\n".join(lines)
    print(table)
    (work / "results.md").write_text(table + "\n")
    (work / "results.json").write_text(json.dumps({"rows": rows, "rho_gamma_m": rho_m, "rho_gamma_a": rho_a,
                                                   "top_bottom_ratio": ratio, "loss": loss, "checks": checks,
                                                   "seconds": times, "statistics": st.to_dict()}, indent=1))
    print(f"wrote {work / 'grid.png'}, {work / 'loss.png'}, {work / 'results.md'}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
