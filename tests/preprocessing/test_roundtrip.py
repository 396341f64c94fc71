"""A sample decoded from a real file, encoded, written to a tar with webdataset's TarWriter and
read back with stock webdataset (no project code, no pickles)."""

from __future__ import annotations

import io
import json

import numpy as np
import webdataset as wds

from core.shard_format import FORMAT_VERSION, decode_members
from preprocessing.process import Decoder


def test_tar_round_trip_with_stock_webdataset(tmp_path, synthetic, video_cfg, image_cfg, encoder):
    video = next(r for r in synthetic["videos"] if r["video"].endswith(".webm"))
    image = next(r for r in synthetic["images"] if "cmyk" in r["image"])
    with Decoder(video_cfg, image_cfg) as dec:
        batch = [dec.decode("video", video["video"], video["caption"]),
                 dec.decode("image", image["image"], image["caption"])]
    records = encoder.encode(batch)
    tar = tmp_path / "000000.tar"
    with wds.TarWriter(str(tar)) as sink:
        for rec in records:
            sample = {"__key__": rec.key}
            for name, data in rec.members():
                sample[name[len(rec.key) + 1 :]] = data
            sink.write(sample)

    read = list(wds.WebDataset(str(tar), shardshuffle=False))
    assert [s["__key__"] for s in read] == [r.key for r in records]
    vid, img = read
    assert set(vid) >= {"__key__", "json", "latents.npy", "motion.npy", "appearance.npy", "txt"}
    assert "motion.npy" not in img and "appearance.npy" not in img
    for raw, rec in zip(read, records):
        latents = np.load(io.BytesIO(raw["latents.npy"]), allow_pickle=False)
        assert latents.dtype == np.float16 and np.array_equal(latents, rec.latents)
        meta = json.loads(raw["json"])
        assert meta["format_version"] == FORMAT_VERSION and meta["source"] == rec.meta["source"]
        assert raw["txt"].decode("utf-8") == rec.caption
    motion = np.load(io.BytesIO(vid["motion.npy"]), allow_pickle=False)
    appearance = np.load(io.BytesIO(vid["appearance.npy"]), allow_pickle=False)
    assert motion.dtype == np.float32 and motion.shape == (7,) and np.array_equal(motion, records[0].motion)
    assert appearance.shape == (8, 8) and np.array_equal(appearance, records[0].appearance)
    meta = json.loads(vid["json"])
    for field in ("source", "frame_indices", "native_fps", "stride", "original_size", "crop_box", "models"):
        assert field in meta, field
    # the project's own reader agrees
    decoded = decode_members(vid)
    assert np.array_equal(decoded["latents"], records[0].latents)

