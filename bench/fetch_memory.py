"""Memory of a shard task's downloads (issue 15): the byte budget (`http.prefetch_bytes`) and
spill files (`http.spill_bytes`) against the old behaviour (up to `max_concurrency` whole
bodies in RAM). Prints a table.

    python bench/fetch_memory.py [--files 32] [--mib 24] [--hold-ms 30]

`--files` bodies of `--mib` MiB each, served on 127.0.0.1 (`testing.hostile_http`), fetched
through `Fetcher.prefetch` by a consumer that holds each file `--hold-ms` (a decoder's time).
`budget peak` is the Fetcher's own count of body bytes in RAM; `py peak` is what tracemalloc
saw Python allocate (bodies, their joins and read buffers), per case.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc

from core.config import load_config
from pipeline.config import PrepConfig
from pipeline.fetch import Fetcher
from testing.hostile_http import HostileHTTP

MIB = 1 << 20


def run(urls: list[str], overrides: list[str], hold_s: float) -> dict[str, float]:
    cfg = load_config(PrepConfig, None, ["http.allowed_networks=[127.0.0.1/32]", *overrides]).http
    fetcher = Fetcher(cfg)
    tracemalloc.start()
    start = time.perf_counter()
    total = 0
    for data, error in fetcher.prefetch(urls):
        assert error is None, error
        total += data.size if hasattr(data, "size") else len(data)
        time.sleep(hold_s)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    pre = fetcher.prefetcher
    return dict(seconds=seconds, mib=total / MIB, budget=pre.budget.peak / MIB, py=peak / MIB,
                spilled=pre.spilled)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=32)
    ap.add_argument("--mib", type=int, default=24)
    ap.add_argument("--hold-ms", type=float, default=30.0)
    args = ap.parse_args()
    body = b"\x5a" * (args.mib * MIB)
    spill = tempfile.mkdtemp(prefix="bench-fetch-")
    unbounded = [f"http.prefetch_bytes={1 << 40}", f"http.spill_bytes={1 << 40}"]
    cases = [("old: 16 whole bodies in RAM", unbounded),
             ("default: 256 MiB budget, spill > 32 MiB", [f"http.spill_dir={spill}"]),
             ("64 MiB budget, spill > 8 MiB", ["http.prefetch_bytes=64MiB", "http.spill_bytes=8MiB",
                                               f"http.spill_dir={spill}"])]
    with HostileHTTP("127.0.0.1") as server:
        urls = [server.route(f"/f{i}", body=body) for i in range(args.files)]
        rows = []
        for name, overrides in cases:
            overrides = [o.replace("64MiB", str(64 * MIB)).replace("8MiB", str(8 * MIB)) for o in overrides]
            rows.append((name, run(urls, overrides, args.hold_ms / 1000)))
    print(f"{args.files} files x {args.mib} MiB over loopback, consumer holds each {args.hold_ms:g} ms; "
          "2 shared CPU cores, timings noisy")
    print(f"{'case':<42} {'fetched MiB':>11} {'budget peak':>11} {'py peak':>9} "
          f"{'spilled':>7} {'s':>6}")
    for name, r in rows:
        print(f"{name:<42} {r['mib']:>11.0f} {r['budget']:>11.1f} {r['py']:>9.1f} "
              f"{r['spilled']:>7d} {r['seconds']:>6.2f}")


if __name__ == "__main__":
    main()
