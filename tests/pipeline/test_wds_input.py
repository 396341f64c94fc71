"""WebDataset tars as manifests: indexing (header reads, offsets), the "tar" converter, bad
samples as failed rows with reasons, manifest-level errors, brace expansion, folders, S3, http,
range fetches. Conversions run in this process (the job runs the same function as Ray tasks)."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pytest
from wdslib import i2d_tars, sample, tar_of, v2d_tars

from core.shard_format import SampleError
from pipeline import plan_convert
from pipeline.config import HttpConfig, ManifestConfig
from pipeline.fetch import Fetcher
from pipeline.manifest import Manifest, ManifestError, ShardPlanner
from pipeline.untrusted import SourcePolicy
from pipeline.wds_input import MemberRef, TarRows, index_tar


class CountingFile(io.BytesIO):
    """Counts the bytes read: indexing must not read media members."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.bytes_read = 0

    def read(self, n: int = -1) -> bytes:
        out = super().read(n)
        self.bytes_read += len(out)
        return out


def _convert_here(jobs, options, batch_rows, column="", params=(), key=None) -> list[int]:
    """`plan_convert.convert_all` without Ray: the same `convert_file` per file, in order."""
    return [plan_convert.convert_file(fmt, src, dst, options, batch_rows, column, params, key)
            for fmt, src, dst in jobs]


@pytest.fixture
def open_tars(tmp_path, monkeypatch):
    """`open_tars(url, kind, options)` -> a Manifest planned into tmp_path/_plan."""
    monkeypatch.setattr(plan_convert, "convert_all", _convert_here)
    return lambda url, kind, options=None: Manifest(url, kind, ManifestConfig(), options or {},
                                                    plan_root=str(tmp_path / "_plan"))


def rows(manifest: Manifest, size: int = 1000) -> list:
    """Convert, plan and materialize every shard (what preflight, the driver and tasks do)."""
    manifest.convert()
    return [plan.materialize() for plan in ShardPlanner(manifest, size).run()]


def verdicts(table, kind: str) -> list:
    """`TarRows.failure` of every row of an index table, as the shard task of `kind` sees them."""
    plan = type("Plan", (), dict(columns={n: table.column(n).to_pylist() for n in table.column_names},
                                 sources=table.column("source").to_pylist(), kind=kind))
    return [TarRows(plan).failure(i) for i in range(table.num_rows)]


def media(row: dict, kind: str = "videos") -> tuple:
    return tuple(row[f"_wds_{kind}{suffix}"] for suffix in ("", "_at", "_size", "_n"))


def test_index_reads_headers_only_and_offsets_point_at_the_media():
    video = bytes(range(256)) * 4000  # 1 MB "mp4": never read while indexing
    members = sample("000000000", "mp4", video, "a red ball", {"url": "u0", "clip": [0, 4]})
    members += sample("000000001", "mp4", video[::-1], "a blue cube", {"url": "u1"})
    data = tar_of(members)
    fh = CountingFile(data)
    table = index_tar(fh, "/d/00000.tar").to_pylist()
    assert fh.bytes_read < 20_000  # headers, captions and JSON, not 2 MB of video
    assert [r["source"] for r in table] == ["/d/00000.tar#000000000", "/d/00000.tar#000000001"]
    assert [r["caption"] for r in table] == ["a red ball", "a blue cube"]
    assert json.loads(table[0]["_wds_meta"]) == {"url": "u0", "clip": [0, 4]}
    for row, want in zip(table, (video, video[::-1])):
        name, offset, size, count = media(row)
        assert data[offset : offset + size] == want and count == 1 and media(row, "images")[3] == 0
        assert row["_wds_reason"] is None


def test_bad_samples_become_failed_rows_naming_tar_and_key():
    members = [
        *sample("a", "mp4", b"v" * 10, None, {"url": "no caption"}),
        *sample("b", None, None, "only a caption", {"url": "no media"}),
        *sample("c", "mp4", b"v" * 10, "bad json", None),
        ("c.json", b"{not json"),
        *sample("d", "mp4", b"v" * 10, "caption", None),
        ("d.txt", b"again"),  # two captions: which one is meant?
        ("../e.mp4", b"v" * 10),
        ("../e.txt", b"traversal"),
        ("f.mp4", b""),
        ("f.txt", b"empty"),
        *sample("g", "jpg", b"i" * 10, "an image in a video tar", None),
    ]
    table = index_tar(io.BytesIO(tar_of(members)), "s3://b/x.tar")
    got = {s.split("#")[1]: v for s, v in zip(table.column("source").to_pylist(), verdicts(table, "videos"))}
    assert got["a"][1] == "bad_caption" and "s3://b/x.tar" in got["a"][2] and "'a'" in got["a"][2]
    assert got["b"][1] == "missing_file" and "no media member" in got["b"][2]
    assert got["c"][1] == "decode_error" and "c.json" in got["c"][2]
    assert got["d"][1] == "bad_caption" and "two" in got["d"][2]
    assert got["../e"][1] == "forbidden_path"
    assert got["f"][1] == "empty_file"
    assert got["g"][1] == "missing_file"  # a jpg is not a video: counted, not dropped
    assert verdicts(table, "images")[-1] is None  # ... and is a good image sample
    assert table.num_rows == 7  # every sample is a row


def test_rows_failed_by_the_index_are_settled_before_any_fetch(tmp_path, open_tars):
    (tmp_path / "x.tar").write_bytes(tar_of(sample("k", "mp4", b"v", None, None)))
    plan = rows(open_tars(str(tmp_path / "x.tar"), "videos"))[0]
    assert TarRows(plan).failure(0)[:2] == ("failed", "bad_caption")
    parquet_like = type("Plan", (), dict(columns={}, sources=["/v.mp4"], kind="videos"))
    assert TarRows(parquet_like).failure(0) is None  # parquet/CSV manifests: no-op


def test_not_a_tar_or_compressed_is_a_manifest_error_naming_the_file(tmp_path, open_tars):
    good = tar_of(sample("k", "mp4", b"v", "c", None))
    (tmp_path / "00000.tar").write_bytes(good)
    (tmp_path / "00001.tar").write_bytes(b"this is not a tar at all " * 40)
    with pytest.raises(ManifestError, match="00001.tar"):
        open_tars(str(tmp_path), "videos")
    (tmp_path / "00001.tar").write_bytes(gzip.compress(good))
    with pytest.raises(ManifestError, match=r"00001.tar.*gzip"):
        open_tars(str(tmp_path), "videos")
    # A valid first header and garbage after it: found while planning, still naming the file.
    (tmp_path / "00001.tar").write_bytes(good[:512] + b"\xff" * 1024)
    manifest = open_tars(str(tmp_path), "videos")
    with pytest.raises(ManifestError, match="00001.tar"):
        rows(manifest)


def test_folder_of_tars_ignores_stats_json_and_keeps_tar_order(synthetic, tmp_path, open_tars):
    records = v2d_tars(synthetic, tmp_path / "v2d")
    manifest = open_tars(str(tmp_path / "v2d"), "videos")
    assert manifest.format == "tar" and len(manifest.files) == 3
    plans = rows(manifest, size=4)
    assert [len(p.sources) for p in plans] == [4, 4, 1]  # shard N = samples N*S .. N*S+S-1
    sources = [s for p in plans for s in p.sources]
    assert sources == [f"{r['tar']}#{r['key']}" for r in records]
    assert [c for p in plans for c in p.captions] == [r["caption"] for r in records]
    images = i2d_tars(synthetic, tmp_path / "i2d")  # beside each tar: _stats.json and a .parquet
    plan = rows(open_tars(str(tmp_path / "i2d"), "images"))[0]
    assert len(plan.sources) == len(images)
    (tmp_path / "i2d" / "mine.parquet").write_bytes((tmp_path / "i2d" / "00000.parquet").read_bytes())
    with pytest.raises(ManifestError, match="mixes formats"):  # a real manifest is not ignored
        open_tars(str(tmp_path / "i2d"), "images")


def test_brace_expansion_in_brace_order_and_missing_files_named(synthetic, tmp_path, open_tars):
    records = i2d_tars(synthetic, tmp_path / "i2d", per_tar=2)
    pattern = str(tmp_path / "i2d" / "{00002,{00000..00001}}.tar")
    plans = rows(open_tars(pattern, "images"))
    keys = [s.split("#")[1] for s in plans[0].sources]
    assert keys == [r["key"] for r in records[4:6] + records[:4]]
    with pytest.raises(ManifestError, match=r"1 of 4 files.*00009.tar"):
        open_tars(str(tmp_path / "i2d" / "{{00000..00002},00009}.tar"), "images")


def test_fetch_reads_the_member_by_offset_and_checks_the_tar_against_the_roots(synthetic, tmp_path,
                                                                             open_tars):
    records = v2d_tars(synthetic, tmp_path / "v2d")
    manifest = open_tars(str(tmp_path / "v2d"), "videos")
    plan = rows(manifest)[0]
    fetcher = Fetcher(HttpConfig())
    ok = SourcePolicy(roots=manifest.roots)
    refs = [TarRows(plan).target(i, s, s, ok) for i, s in enumerate(plan.sources)]
    assert [fetcher.fetch(r) for r in refs[:2]] == [Path(r["path"]).read_bytes() for r in records[:2]]
    assert all(isinstance(r, MemberRef) for r in refs) and len(refs) == len(records)
    elsewhere = SourcePolicy(roots=(str(synthetic),))
    with pytest.raises(SampleError, match="allowed_roots") as err:
        fetcher.fetch(TarRows(plan).target(0, plan.sources[0], plan.sources[0], elsewhere))
    assert err.value.reason == "forbidden_path"
    small = Fetcher(HttpConfig(max_bytes=100))
    assert [r for _, r in small.prefetch(refs[:1])][0].reason == "download_error"


def test_tar_on_s3_with_braces(moto_s3, synthetic, tmp_path, open_tars):
    records = v2d_tars(synthetic, tmp_path / "v2d")
    fs = moto_s3.fs()
    fs.mkdir("wds")
    for path in sorted((tmp_path / "v2d").iterdir()):
        fs.put_file(str(path), f"wds/v2d/{path.name}")
    url = "s3://wds/v2d/{00000..00002}.tar"
    manifest = open_tars(url, "videos", moto_s3.options())
    plan = rows(manifest)[0]
    assert plan.sources[0] == f"s3://wds/v2d/00000.tar#{records[0]['key']}"
    assert manifest.roots == ()  # a remote manifest's rows may only name URLs
    fetcher = Fetcher(HttpConfig(), moto_s3.options())
    ref = TarRows(plan).target(4, plan.sources[4], plan.sources[4], SourcePolicy())
    assert fetcher.fetch(ref) == Path(records[4]["path"]).read_bytes()
    assert [r["rows"] for r in manifest.file_records()] == [3, 3, 3]


def test_tarinfo_names_follow_webdataset_grouping():
    # dir/KEY.ext groups by the full stem; a key seen again later is a second row (a duplicate
    # source, which the planner fails as `duplicate`).
    members = sample("d/k1", "png", b"p", "one", None) + sample("d/k2", "png", b"p", "two", None)
    members += sample("d/k1", "png", b"p", "again", None)
    table = index_tar(io.BytesIO(tar_of(members)), "/t.tar").to_pylist()
    assert [r["source"] for r in table] == ["/t.tar#d/k1", "/t.tar#d/k2", "/t.tar#d/k1"]


@pytest.fixture
def tar_server(synthetic, tmp_path):
    """HTTP on 127.0.0.1 serving video2dataset tars at `/v2d/0000N.tar` with Range support, and
    the same bytes at `/norange/...` without it. Yields (base URL, records)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    records = v2d_tars(synthetic, tmp_path / "v2d")
    files = {f"/v2d/{p.name}": p.read_bytes() for p in (tmp_path / "v2d").glob("*.tar")}
    files.update({f"/norange/{p.name}": p.read_bytes() for p in (tmp_path / "v2d").glob("*.tar")})

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _reply(self, head: bool) -> None:
            data = files.get(self.path)
            if data is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            wanted = self.headers.get("Range")
            if wanted and not self.path.startswith("/norange/"):
                start, end = (int(v) for v in wanted.split("=")[1].split("-"))
                body = data[start : end + 1]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
            else:
                body = data
                self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def do_HEAD(self):
            self._reply(True)

        def do_GET(self):
            self._reply(False)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", records
    finally:
        server.shutdown()
        server.server_close()


def test_tars_over_http_range_reads_through_the_guarded_client(tar_server, open_tars):
    base, records = tar_server
    manifest = open_tars(base + "/v2d/{00000..00002}.tar", "videos")
    plan = rows(manifest)[0]
    assert plan.sources == [f"{base}/v2d/{r['tar'][-9:]}#{r['key']}" for r in records]
    tar_rows, policy = TarRows(plan), SourcePolicy()
    loopback_ok = Fetcher(HttpConfig(allowed_networks=["127.0.0.1/32"]))
    ref = tar_rows.target(4, plan.sources[4], plan.sources[4], policy)
    assert loopback_ok.fetch(ref) == Path(records[4]["path"]).read_bytes()
    with pytest.raises(SampleError) as err:  # the media read is a row's download: address rules
        Fetcher(HttpConfig()).fetch(ref)
    assert err.value.reason == "blocked_address"
    norange = MemberRef(ref.url.replace("/v2d/", "/norange/"), ref.offset, ref.size, ref.shown, policy)
    with pytest.raises(SampleError, match="Range request not served"):
        loopback_ok.fetch(norange)


def test_member_ref_finds_the_tar_of_odd_keys():
    members = sample("a#b", "png", b"p", "hash in key", None) + sample(" pad ", "png", b"q", "spaces", None)
    table = index_tar(io.BytesIO(tar_of(members)), "/t.tar")
    stored = [s.strip() for s in table.column("source").to_pylist()]  # as the manifest stores them
    plan = type("Plan", (), dict(columns={n: table.column(n).to_pylist() for n in table.column_names},
                                 sources=stored, kind="images"))
    refs = [TarRows(plan).target(i, s, s, SourcePolicy()) for i, s in enumerate(stored)]
    assert [r.url for r in refs] == ["/t.tar", "/t.tar"] and [r.size for r in refs] == [1, 1]
