"""`python -m pipeline.prep`: manifests -> WebDataset shards (docs/shard-format.md) on a Ray cluster.

    python -m pipeline.prep --videos MANIFEST --images MANIFEST --out OUT \\
        [--config configs/prep/tiny.yaml] [--samples-per-shard N] [--overwrite] [--retry-failed[=all]] \\
        [section.field=value ...]

With RAY_ADDRESS set (as `ray job submit` does) it joins that cluster, otherwise it starts a
local one. Rerunning the same command resumes: committed shards are skipped. The design is
explained in `pipeline/runner.py` and `pipeline/shard.py`.
"""

from __future__ import annotations

import argparse
import sys

from core.config import ConfigError, load_config
from pipeline.config import PrepConfig
from pipeline.lease import LeaseError
from pipeline.manifest import ManifestError
from pipeline.retry import RETRY_MODES
from pipeline.runner import JobArgs, JobError, PrepJob
from pipeline.storage import OutputError
from pipeline.untrusted import DEFAULT_REDACT_PARAMS, redact_text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.prep", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--videos",
        help="video manifest: parquet/CSV/JSONL file, folder or glob, any fsspec URL; or WebDataset "
        "tars (video2dataset output): a folder, a glob or 'DIR/{00000..00099}.tar'",
    )
    parser.add_argument(
        "--images", help="image manifest (LAION-style `URL`/`TEXT` columns work as is), or img2dataset tars"
    )
    parser.add_argument(
        "--out", required=True, help="output root: local path or fsspec URL (s3://bucket/prefix)"
    )
    parser.add_argument("--config", help="YAML config (configs/prep/tiny.yaml, configs/prep/default.yaml)")
    parser.add_argument("--samples-per-shard", type=int, help="rows per shard (overrides samples_per_shard)")
    parser.add_argument(
        "--overwrite", action="store_true", help="delete existing shards under OUT and start again"
    )
    parser.add_argument(
        "--retry-failed", choices=RETRY_MODES, default=None,
        help="also redo failed rows of committed shards: transient failures (timeouts, 5xx, encode "
        "and internal errors, refusals by a rule since widened) with no value or =transient; every "
        "failure (404, decode errors, too short...) with =all",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan (files, rows, shards, to do) and exit"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides: section.field=value")
    # A bare --retry-failed means =transient. Spelt out here, so that argparse never takes the
    # next word (a section.field=value override) for its value.
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = ["--retry-failed=transient" if a == "--retry-failed" else a for a in argv]
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.samples_per_shard is not None:
        overrides.append(f"samples_per_shard={args.samples_per_shard}")
    try:
        cfg = load_config(PrepConfig, args.config, overrides)
        job = JobArgs(
            out=args.out,
            videos=args.videos,
            images=args.images,
            overwrite=args.overwrite,
            retry_failed=args.retry_failed or False,
            dry_run=args.dry_run,
        )
        if args.dry_run:
            text, ok = PrepJob(cfg, job).dry_run()
            print(text)
            return 0 if ok else 2
        summary = PrepJob(cfg, job).run()
    except (ConfigError, ManifestError, OutputError, JobError, LeaseError) as exc:
        # The default list: a ConfigError may come before any config exists.
        print(f"error: {redact_text(str(exc), DEFAULT_REDACT_PARAMS)}", file=sys.stderr)
        return 2
    print(summary.table())
    return 0 if summary.complete else 1


if __name__ == "__main__":
    sys.exit(main())
