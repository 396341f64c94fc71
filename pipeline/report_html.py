"""Plots (matplotlib, Agg) and the HTML / Markdown pages of the dataset report."""

from __future__ import annotations

import html
import io
import json
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PLOTS = {
    "motion.png": "Motion factors (raw Frobenius norms of consecutive latent differences)",
    "appearance.png": "Appearance factor γa = 1 - A[0, F-1]",
    "lengths.png": "Clip lengths",
    "failures.png": "Failure reasons",
    "scatter.png": "Motion vs appearance factor (paper Fig. 10)",
}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _hist(ax, values: np.ndarray, title: str, xlabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    if values.size == 0:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    ax.hist(values, bins=min(50, max(5, int(math.sqrt(values.size)))), color="#4477aa")
    ax.set_ylabel("count")


def plot_motion(videos) -> bytes:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    _hist(axes[0], videos.motion_raw, "raw motion factors (all frame pairs)", "‖z[f+1] − z[f]‖")
    _hist(axes[1], videos.motion_mean, "mean motion factor per clip", "mean over F−1 pairs")
    return _png(fig)


def plot_appearance(videos) -> bytes:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    _hist(ax, videos.appearance_factor, "appearance factor per clip", "γa = 1 − A[0, F−1]")
    return _png(fig)


def plot_lengths(videos) -> bytes:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    _hist(axes[0], videos.frames.astype(np.float64), "frames per clip", "frames")
    _hist(axes[1], videos.span_seconds, "source span per clip", "seconds")
    return _png(fig)


def plot_failures(reports: dict[str, Any]) -> bytes:
    fig, ax = plt.subplots(figsize=(8, 3.5))
    reasons = sorted({r for rep in reports.values() for r in rep.reasons})
    if not reasons:
        ax.text(0.5, 0.5, "no failures", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _png(fig)
    y = np.arange(len(reasons))
    left = np.zeros(len(reasons))
    for kind, rep in reports.items():
        counts = np.array([rep.reasons.get(r, 0) for r in reasons], np.float64)
        ax.barh(y, counts, left=left, label=kind)
        left += counts
    ax.set_yticks(y, reasons)
    ax.set_xlabel("failed samples")
    ax.legend()
    return _png(fig)


def plot_scatter(videos) -> bytes:
    fig, ax = plt.subplots(figsize=(5, 4))
    x, y = videos.motion_mean, videos.appearance_factor
    if x.size == 0:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.scatter(x, y, s=6, alpha=0.5, color="#aa3377")
    ax.set_xlabel("mean motion factor (raw)")
    ax.set_ylabel("appearance factor γa")
    ax.set_title(f"Pearson r = {videos.pearson():.3f}  (n = {x.size})", fontsize=10)
    return _png(fig)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _counts_table(reports: dict[str, Any]) -> list[list[str]]:
    rows = [["kind", "shards", "incomplete shards", "rows", "ok", "failed", "samples in tars"]]
    for kind, rep in reports.items():
        rows.append(
            [
                kind,
                str(rep.shards),
                str(len(rep.incomplete_shards)),
                str(rep.rows),
                str(rep.status.get("ok", 0)),
                str(rep.status.get("failed", 0)),
                str(rep.samples),
            ]
        )
    return rows


def _reason_table(reports: dict[str, Any]) -> list[list[str]]:
    rows = [["kind", "reason", "count"]]
    for kind, rep in reports.items():
        rows += [[kind, reason, str(n)] for reason, n in rep.reasons.most_common()]
    return rows


def _stats_table(videos) -> list[list[str]]:
    s = videos.summary()
    rows = [["quantity", "mean", "std", "min", "median", "max"]]
    for name in ("motion_raw", "motion_mean_per_clip", "appearance_factor", "frames", "span_seconds"):
        st = s[name]
        rows.append(
            [name] + ([_fmt(st[k]) for k in ("mean", "std", "min", "median", "max")] if st else ["-"] * 5)
        )
    return rows


def _md_table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _warnings(reports: dict[str, Any]) -> list[str]:
    out = []
    for kind, rep in reports.items():
        if rep.incomplete_shards:
            out.append(
                f"{kind}: {len(rep.incomplete_shards)} incomplete shard(s) (no NNNNNN.json) "
                "not counted: " + ", ".join(rep.incomplete_shards[:10])
            )
        if rep.samples != rep.status.get("ok", 0):
            out.append(
                f"{kind}: the tars hold {rep.samples} samples but the status tables say "
                f"{rep.status.get('ok', 0)} ok"
            )
        if rep.unreadable:
            out.append(f"{kind}: unreadable small members: {dict(rep.unreadable)}")
    return out


def render(reports: dict[str, Any], dataset: dict[str, Any], source: str) -> dict[str, bytes]:
    """{file name: bytes} for index.html, report.md and the PNG plots."""
    videos = reports["videos"]
    files = {
        "motion.png": plot_motion(videos),
        "appearance.png": plot_appearance(videos),
        "lengths.png": plot_lengths(videos),
        "failures.png": plot_failures(reports),
        "scatter.png": plot_scatter(videos),
    }
    counts, reasons, stats = _counts_table(reports), _reason_table(reports), _stats_table(videos)
    warnings = _warnings(reports)
    pearson = _fmt(videos.pearson())
    note = (
        "Motion factors are stored raw; the model multiplies them by its motion scale (10 by "
        "default) before embedding, and the paper's γm range 300–600 refers to that scale at "
        "448×256. The factor grows with resolution."
    )
    md = [
        f"# Dataset report: {source}",
        "",
        "## Counts (status tables)",
        _md_table(counts),
        "",
        "## Failure reasons",
        _md_table(reasons),
        "",
        "## Video clip statistics",
        _md_table(stats),
        "",
        f"Pearson correlation of per-clip mean motion and γa: **{pearson}** "
        "(paper Fig. 10: 0.40 with DINO features on 8000 clips).",
        "",
        note,
        "",
    ]
    if warnings:
        md += ["## Warnings", *[f"- {w}" for w in warnings], ""]
    md += ["## Plots", *[f"![{title}]({name})" for name, title in PLOTS.items()], ""]
    if dataset:
        md += ["## dataset.json", "```json", json.dumps(dataset, indent=2, default=str), "```", ""]
    files["report.md"] = "\n".join(md).encode()

    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}"
        ".warn{color:#a33}"
    )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Dataset report</title>"
        f"<style>{style}</style></head><body>",
        f"<h1>Dataset report</h1><p>{html.escape(source)}</p>",
        "<h2>Counts (status tables)</h2>",
        _html_table(counts),
        "<h2>Failure reasons</h2>",
        _html_table(reasons),
        "<h2>Video clip statistics</h2>",
        _html_table(stats),
        f"<p>Pearson correlation of per-clip mean motion and γa: <b>{pearson}</b> "
        "(paper Fig. 10: 0.40 with DINO features).</p>",
        f"<p>{html.escape(note)}</p>",
    ]
    if warnings:
        items = [f"<li class='warn'>{html.escape(w)}</li>" for w in warnings]
        parts += ["<h2>Warnings</h2><ul>", *items, "</ul>"]
    for name, title in PLOTS.items():
        parts.append(f"<h2>{html.escape(title)}</h2><img src='{name}' alt='{html.escape(title)}'>")
    if dataset:
        parts.append(
            "<h2>dataset.json</h2><pre>" + html.escape(json.dumps(dataset, indent=2, default=str)) + "</pre>"
        )
    parts.append("</body></html>")
    files["index.html"] = "\n".join(parts).encode()
    return files
