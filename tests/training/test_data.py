"""The training data stream against hostile shards: every bad kind is skipped and counted, the
stream never stops; tar reading refuses compression, oversized and unknown members; sampling
is uniform over samples and shuffled across shards, and still resumes exactly."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from shards import FRAMES, H, W, make_dataset, record, write_dataset_json, write_shard

from core.shards import ShardError, iter_samples, npy_bytes
from training.config import DataConfig, RolesConfig
from training.data import RoleLoader
from training.roles import RankRole, assign_role
from training.sources import load_source


def replace(members, ext: str, data: bytes | None):
    """The sample's members with KEY.ext replaced (or dropped when data is None)."""
    out = [(n, data if n.split(".", 1)[1] == ext else b) for n, b in members]
    return [(n, b) for n, b in out if b is not None]


def with_npy(members, ext: str, array: np.ndarray):
    return replace(members, ext, npy_bytes(array))


class Exploit:
    """Unpickling this creates a file: proof that nothing was unpickled is that it does not exist."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def bad_kinds(rng: np.random.Generator, tmp: Path) -> dict[str, list]:
    """One bad sample per kind -> the reason it must be counted under."""
    good = lambda i: record("video", 1000 + i, rng)  # noqa: E731
    lat = rng.standard_normal((FRAMES, 4, H, W))
    nan = lat.astype(np.float16)
    nan[0, 0, 0, 0] = np.nan
    inf = lat.astype(np.float16)
    inf[1, 1, 1, 1] = np.inf
    obj = np.array([Exploit(str(tmp / "pwned")), 1], dtype=object)
    obj_npy = io.BytesIO()
    np.save(obj_npy, obj, allow_pickle=True)
    huge_header = npy_bytes(np.zeros((FRAMES, 4, H, W), np.float16)).replace(
        f"({FRAMES}, 4, {H}, {W})".encode(), f"({FRAMES}, 4, {H * 1000}, {W})".encode()
    )
    app = record("video", 2000, rng)
    tokens = good(19)
    tokens.append((tokens[0][0].split(".")[0] + ".text.npy", npy_bytes(np.zeros((77, 8), np.float16))))
    dup = good(20)
    appearance = np.full((FRAMES, FRAMES), 1.5, np.float32)
    return {
        "nan latents": (with_npy(good(0), "latents.npy", nan), "non_finite"),
        "inf latents": (with_npy(good(1), "latents.npy", inf), "non_finite"),
        "int8 latents": (with_npy(good(2), "latents.npy", lat.astype(np.int8)), "bad_dtype"),
        "float64 latents": (with_npy(good(3), "latents.npy", lat), "bad_dtype"),
        "1x1 latents": (
            with_npy(good(4), "latents.npy", np.zeros((FRAMES, 4, 1, 1), np.float16)),
            "bad_shape",
        ),
        "other latent size": (
            with_npy(good(5), "latents.npy", np.zeros((FRAMES, 4, H, 2 * W), np.float16)),
            "bad_shape",
        ),
        "header claims more data": (replace(good(6), "latents.npy", huge_header), "bad_npy"),
        "short motion": (with_npy(good(7), "motion.npy", np.ones(FRAMES - 2, np.float32)), "bad_shape"),
        "nan motion": (
            with_npy(good(8), "motion.npy", np.full(FRAMES - 1, np.nan, np.float32)),
            "non_finite",
        ),
        "appearance > 1": (with_npy(app, "appearance.npy", appearance), "out_of_range"),
        "appearance shape": (
            with_npy(good(9), "appearance.npy", np.eye(FRAMES - 1, dtype=np.float32)),
            "bad_shape",
        ),
        "json list": (replace(good(10), "json", b"[1, 2]"), "bad_json"),
        "json garbage": (replace(good(11), "json", b"{not json"), "bad_json"),
        "json too large": (
            replace(good(12), "json", json.dumps({"format_version": 1, "x": "a" * (2 << 20)}).encode()),
            "json_too_large",
        ),
        "deep json": (replace(good(13), "json", b"[" * 100_000 + b"]" * 100_000), "bad_json"),
        "old format": (replace(good(14), "json", b'{"format_version": 0}'), "format_version"),
        "no latents": (replace(good(15), "latents.npy", None), "missing_member"),
        "pickled latents": (replace(good(16), "latents.npy", obj_npy.getvalue()), "bad_npy"),
        "truncated npy": (replace(good(17), "latents.npy", npy_bytes(nan)[:20]), "bad_npy"),
        "caption not utf-8": (replace(good(18), "txt", b"\xff\xfe\xfa"), "bad_caption"),
        "text tokens wrong width": (tokens, "bad_shape"),
        "duplicate member": (dup + [dup[1]], "duplicate_member"),
    }


def sequential(**kw) -> DataConfig:
    return DataConfig(num_workers=0, shuffle_shards=1, **kw)  # one open shard: file order


def test_every_bad_kind_is_skipped_counted_and_the_batches_still_come(tmp_path):
    """Before: one sample of another latent size made collate raise inside the try, `examples`
    was never cleared, and the stream read shards forever without yielding a batch."""
    rng = np.random.default_rng(0)
    kinds = bad_kinds(rng, tmp_path)
    samples, good = [], 0
    for members, _ in kinds.values():
        samples += [record("video", good, rng), members]
        good += 1
    # Members of unknown extensions are skipped unread: a .pyd and a pickle that would write a file.
    evil = pickle.dumps(Exploit(str(tmp_path / "pwned")))
    extra = record("video", good, rng)
    key = extra[0][0].split(".")[0]
    samples.append(extra + [(f"{key}.pickle", evil), (f"{key}.pyd", b"MZ\x90\x00" * 100)])
    good += 1
    (tmp_path / "videos").mkdir()
    write_shard(tmp_path / "videos" / "000000.tar", samples)
    write_dataset_json(tmp_path)
    src = load_source(str(tmp_path), "video", text_dim=64)
    loader = RoleLoader(src, assign_role(RolesConfig(video_micro_batch=good), 0, 1), sequential())
    batch = next(loader)  # all the good samples of the shard, in order
    assert batch["latents"].shape == (good, 4, FRAMES, H, W)
    want = Counter(reason for _, reason in kinds.values())
    assert loader.bad == want
    assert loader.events["unknown_member"] == 2
    assert not (tmp_path / "pwned").exists()
    assert torch.isfinite(batch["latents"]).all() and torch.isfinite(batch["motion"]).all()
    again = next(loader)  # the shard comes round again: the same counts once more
    assert again["latents"].shape == batch["latents"].shape
    assert loader.bad == Counter({k: 2 * n for k, n in want.items()})


def plain_tar(path: Path, members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


class CountingFile(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.read_bytes = 0

    def read(self, n: int = -1) -> bytes:
        out = super().read(n)
        self.read_bytes += len(out)
        return out


def test_gzip_bomb_is_rejected_without_decompressing(tmp_path):
    # 64 MiB of zeros in one member: about 64 KB compressed.
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("0123.latents.npy")
        info.size = 64 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    bomb = gzip.compress(raw.getvalue(), compresslevel=9)
    del raw
    assert len(bomb) < 2 << 20
    f = CountingFile(bomb)
    with pytest.raises(ShardError, match="gzip-compressed"):
        list(iter_samples(f))
    assert f.read_bytes <= 8  # the magic bytes only
    # In the loader: counted as a bad shard, the good shard still feeds batches.
    data = make_dataset(tmp_path, video_shards=1, image_shards=0, per_shard=3, kinds=("video",))
    (data / "videos" / "000001.tar").write_bytes(bomb)
    (data / "videos" / "000001.json").write_text('{"ok": 3}')
    loader = RoleLoader(
        load_source(str(data), "video", text_dim=64),
        assign_role(RolesConfig(), 0, 1),
        DataConfig(num_workers=0, shuffle_shards=2),
    )
    got = [next(loader) for _ in range(6)]
    assert all(b["latents"].shape[0] == 3 for b in got)
    assert loader.bad["bad_shard"] >= 1 and set(loader.bad) == {"bad_shard"}


def test_member_size_cap_is_checked_from_the_header_before_reading(tmp_path):
    rng = np.random.default_rng(0)
    small, big = record("video", 0, rng), record("video", 1, rng)
    big_key = big[0][0].split(".")[0]
    big = replace(big, "txt", b"x" * (3 << 20))  # a 3 MiB caption member
    data = plain_tar(tmp_path / "a.tar", small + big + record("video", 2, rng))
    f = CountingFile(data)
    got = list(iter_samples(f, max_member_bytes=1 << 20))
    assert [s.problem for s in got] == [None, "member_too_large", None]
    assert got[1].key == big_key and "txt" not in got[1].members
    assert f.read_bytes < 1 << 20  # the 3 MiB member was seeked over, never read
    # Only the extensions asked for are read: the report reads the small members only.
    f = CountingFile(data)
    small_only = list(iter_samples(f, wanted=("json", "motion.npy")))
    assert all(set(s.members) == {"json", "motion.npy"} for s in small_only)
    assert f.read_bytes < 1 << 20


def test_skip_reads_no_member_bytes(tmp_path):
    rng = np.random.default_rng(0)
    samples = [record("video", i, rng) for i in range(20)]
    data = plain_tar(tmp_path / "a.tar", [m for s in samples for m in s])
    f = CountingFile(data)
    rest = list(iter_samples(f, skip=18))
    assert [s.index for s in rest] == [18, 19]
    assert rest[0].members["txt"] == samples[18][-1][1]
    skipped_payload = sum(len(b) for s in samples[:18] for _, b in s)
    assert f.read_bytes <= len(data) - skipped_payload  # tar headers only for the skipped samples


def image_shards(root: Path, sizes: list[int]) -> Path:
    """Image shards of the given sample counts (tiny 1x1 latents: dataset.json says 8x8 frames)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    write_dataset_json(root, h=1, w=1)
    n = 0
    for s, size in enumerate(sizes):
        samples = []
        for _ in range(size):
            members = record("image", n, rng)
            samples.append(
                with_npy(members, "latents.npy", rng.standard_normal((4, 1, 1)).astype(np.float16))
            )
            n += 1
        write_shard(root / "images" / f"{s:06d}.tar", samples)
    return root


def test_sampling_is_uniform_over_samples_not_over_shards(tmp_path):
    """A 1-sample shard next to a 100-sample shard: each of the 101 samples is drawn as often."""
    src = load_source(str(image_shards(tmp_path, [1, 100])), "image")
    assert src.sizes == [1, 100]  # from the shard stats json
    role = RankRole("image", 0, 1, micro_batch=101)
    loader = RoleLoader(src, role, DataConfig(num_workers=0))
    counts = Counter()
    for _ in range(100):
        counts.update(next(loader)["caption"])
    assert len(counts) == 101
    expect = 100 * 101 / 101
    assert all(abs(n - expect) <= 0.1 * expect for n in counts.values()), counts.most_common()[::50]


def test_sizes_come_from_index_parquet_when_present(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = image_shards(tmp_path, [2, 3, 0])
    rows = [
        {"kind": "images", "shard": f"{i:06d}", "ok": n, "failed": 0, "tar_bytes": 1}
        for i, n in enumerate([7, 9])
    ]
    pq.write_table(pa.Table.from_pylist(rows), root / "index.parquet")
    src = load_source(str(root), "image")
    assert src.sizes == [7, 9, 0]  # the third shard is not in the index: its stats json says 0
    loader = RoleLoader(src, RankRole("image", 0, 1, micro_batch=5), DataConfig(num_workers=0))
    assert all(not s.endswith("000002.tar") for _ in range(10) for s in next(loader)["shards"])


@pytest.mark.parametrize("workers", [0, 2])
def test_samples_interleave_shards_and_resume_exactly_with_a_shuffle_buffer(tmp_path, workers):
    data = make_dataset(tmp_path, video_shards=6, per_shard=8, kinds=("video",))
    src = load_source(str(data), "video", text_dim=64)
    role = assign_role(RolesConfig(video_micro_batch=4), 0, 1)
    cfg = DataConfig(num_workers=workers, shuffle_shards=4, shuffle_buffer=5, seed=2)
    first = RoleLoader(src, role, cfg)
    head = [next(first) for _ in range(7)]
    state = json.loads(json.dumps(first.state_dict()))
    assert any(p["buffer"] for p in state["positions"].values())  # the buffer is part of the state
    tail = [next(first) for _ in range(9)]
    resumed = RoleLoader(src, role, cfg)
    resumed.load_state_dict(state)
    again = [next(resumed) for _ in range(9)]
    assert all(
        torch.equal(a["latents"], b["latents"]) and a["caption"] == b["caption"] for a, b in zip(tail, again)
    )
    shards = [b["shards"] for b in head + tail]
    pairs = [(x, y) for s in shards for i, x in enumerate(s) for y in s[i + 1 :]]
    assert sum(x == y for x, y in pairs) / len(pairs) <= 0.3  # no micro-batch from one shard
    unshuffled = RoleLoader(src, role, DataConfig(num_workers=workers, shuffle_shards=1))
    assert all(len(set(next(unshuffled)["shards"])) <= 2 for _ in range(4))  # what it was before


def test_resume_with_other_shuffle_settings_rederives_the_streams(tmp_path, capsys):
    src = load_source(
        str(make_dataset(tmp_path, video_shards=2, per_shard=3, kinds=("video",))), "video", text_dim=64
    )
    role = assign_role(RolesConfig(video_micro_batch=2), 0, 1)
    old = RoleLoader(src, role, DataConfig(num_workers=0, shuffle_shards=2))
    next(old)
    new = RoleLoader(src, role, DataConfig(num_workers=0, shuffle_shards=3))
    new.load_state_dict(old.state_dict())
    assert "streams re-derived" in capsys.readouterr().out
    assert new.batches == 0 and next(new)["latents"].shape == (2, 4, FRAMES, H, W)
