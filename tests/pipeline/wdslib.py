"""Helpers of the WebDataset-input tests: video2dataset- and img2dataset-style tars."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pandas as pd

Member = tuple[str, bytes]  # (member name, bytes)


def tar_of(members: list[Member]) -> bytes:
    """A plain tar of `members` in order, with fixed mtimes (the same bytes every time)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sample(key: str, ext: str, media: bytes | None, caption: str | None, meta: dict | None) -> list[Member]:
    """One input sample as video2dataset/img2dataset write it: KEY.EXT, KEY.txt, KEY.json."""
    out: list[Member] = []
    if media is not None:
        out.append((f"{key}.{ext}", media))
    if caption is not None:
        out.append((f"{key}.txt", caption.encode()))
    if meta is not None:
        out.append((f"{key}.json", json.dumps(meta).encode()))
    return out


def v2d_tars(synthetic: Path, folder: Path, per_tar: int = 3) -> list[dict]:
    """The synthetic fixture's good videos as video2dataset output: `folder/0000N.tar` (9-digit
    keys, mp4/avi/webm + txt + json) and a `_stats.json` per tar. Returns one record per sample:
    tar path, key, caption, meta, media path, in tar order."""
    videos = pd.read_parquet(synthetic / "videos.parquet")
    good = videos[~videos.video.str.contains("/bad/")].reset_index(drop=True)
    return _write(folder, [(Path(r.video), r.caption) for r in good.itertuples()], per_tar, "v2d")


def i2d_tars(synthetic: Path, folder: Path, per_tar: int = 3) -> list[dict]:
    """The fixture's good images as img2dataset output (jpg/png + txt + json per sample)."""
    images = pd.read_parquet(synthetic / "good_images.parquet")
    return _write(folder, [(Path(r.image), r.caption) for r in images.itertuples()], per_tar, "i2d")


def _write(folder: Path, files: list[tuple[Path, str]], per_tar: int, tool: str) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for t in range(0, len(files), per_tar):
        shard, members = t // per_tar, []
        for i, (path, caption) in enumerate(files[t : t + per_tar]):
            key = f"{shard:05d}{i:04d}"
            meta = {"url": f"https://example.com/{path.name}", "key": key, "status": "success", "tool": tool}
            ext = path.suffix[1:].lower()
            members += sample(key, ext, path.read_bytes(), caption, meta)
            records.append(dict(tar=str(folder / f"{shard:05d}.tar"), key=key, caption=caption, meta=meta,
                                path=str(path)))
        (folder / f"{shard:05d}.tar").write_bytes(tar_of(members))
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": len(members) // 3}))
        if tool == "i2d":  # img2dataset also writes a parquet of its rows beside each tar
            pd.DataFrame([{"key": r["key"], "caption": r["caption"]} for r in records[t:]]).to_parquet(
                folder / f"{shard:05d}.parquet", index=False)
    return records
