"""Preflight: everything that can fail before work starts, checked in one place.

Manifests and columns, the output root (writable, not held by another job), the config
fingerprint, and the manifest files the output was planned from (`pipeline/resume.py`). A
`--dry-run` runs the same checks without writing anything and reports problems instead of
raising, so the plan it prints is the one the real run would follow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.config import PrepConfig, prep_fingerprint
from pipeline.lease import Lease
from pipeline.manifest import Manifest
from pipeline.plan import cut
from pipeline.resume import FileCheck, compare
from pipeline.retry import retry_mode
from pipeline.storage import KINDS, OutputStore
from pipeline.untrusted import redact_url


class JobError(RuntimeError):
    """The job cannot start; the message says what to change."""


@dataclass
class JobArgs:
    out: str
    videos: str | None = None
    images: str | None = None
    overwrite: bool = False
    retry_failed: bool | str = False  # False, "transient" (True means it too) or "all"
    dry_run: bool = False

    def __post_init__(self) -> None:
        try:
            self.retry_failed = retry_mode(self.retry_failed) or False
        except ValueError as exc:
            raise JobError(str(exc)) from None

    def manifests(self) -> dict[str, str | None]:
        return {"videos": self.videos, "images": self.images}


@dataclass
class Ready:
    """What the later steps need, once preflight passed."""

    manifests: dict[str, Manifest]
    store: OutputStore
    fingerprint: str
    lease: Lease | None  # None in a dry run: it writes nothing
    files: dict[str, list[dict[str, Any]]]  # manifest file records per kind (dataset.json)
    checks: dict[str, FileCheck] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # dry run: what the real run would refuse


class Preflight:
    def __init__(self, cfg: PrepConfig, args: JobArgs):
        self.cfg, self.args = cfg, args

    def run(self) -> Ready:
        if not self.args.videos and not self.args.images:
            raise JobError("nothing to do: pass --videos MANIFEST and/or --images MANIFEST")
        opts = self.cfg.storage.options
        out = OutputStore(self.args.out, opts)
        plan_root = out.path("_plan") if out.is_local else out.fs.unstrip_protocol(out.path("_plan"))
        manifests = {
            kind: Manifest(url, kind, self.cfg.manifest, opts, plan_root=plan_root)
            for kind, url in self.args.manifests().items()
            if url
        }
        files = {kind: m.file_records() for kind, m in manifests.items()}
        fingerprint = prep_fingerprint(self.cfg)
        if self.args.dry_run:
            store = OutputStore(self.args.out, opts)
            ready = Ready(manifests, store, fingerprint, None, files)
            if not self.args.overwrite:
                self._verify(ready)
            return ready
        lease = Lease(OutputStore(self.args.out, opts), self.cfg.execution.lease_timeout_s)
        store = OutputStore(self.args.out, opts, run_id=lease.run_id)
        store.check_writable()
        lease.acquire()  # before --overwrite deletes anything: a running job's shards are not ours
        ready = Ready(manifests, store, fingerprint, lease, files)
        try:
            if self.args.overwrite:
                for kind in KINDS:
                    store.remove_shards(kind)
                store.remove([p for p in [store.path("dataset.json")] if store.fs.exists(p)])
            else:
                self._verify(ready)
                if ready.problems:
                    raise JobError(ready.problems[0])
                self._drop_partial_shards(ready)
        except BaseException:
            lease.release()
            raise
        if lease.taken_over:  # the dead run's temporary files can go now
            store.clean_tmp(str(lease.taken_over.get("run_id") or "run"))
        return ready

    def _verify(self, ready: Ready) -> None:
        """Fill `ready.checks` and `ready.problems` against what the output was written from."""
        store, out = ready.store, self.args.out
        old = store.read_json(store.path("dataset.json"))
        if old is None:
            # No dataset.json but committed shards: compare with one shard's own fingerprint.
            for kind in KINDS:
                done = sorted(store.committed(kind))
                if done:
                    old = store.read_json(store.shard_path(kind, done[0], "json"))
                    break
        if old is None:
            return
        if old.get("fingerprint") != ready.fingerprint:
            ready.problems.append(
                f"{out} was written with a different config (fingerprint {old.get('fingerprint')}, "
                f"now {ready.fingerprint}); its shards would mix two settings. Rerun with the same config, "
                "choose another --out, or pass --overwrite to delete them and start again"
            )
        for kind, url in self.args.manifests().items():
            before = (old.get("manifests") or {}).get(kind)
            url = url and redact_url(url, self.cfg.manifest.redact_query_params)  # as stored
            if url and before and before != url:
                ready.problems.append(
                    f"{out}/{kind} was written from manifest {before}, not {url}; "
                    "pass the same manifest to resume, or --overwrite to start again"
                )
            recorded = (old.get("manifest_files") or {}).get(kind)
            if url and recorded is not None:
                check = compare(recorded, ready.files[kind], self.cfg.samples_per_shard)
                ready.checks[kind] = check
                if check.change:
                    ready.problems.append(check.message(kind, out))
            if url and not (kind in ready.checks and ready.checks[kind].change):
                self._verify_pieces(ready, kind)

    def _verify_pieces(self, ready: Ready, kind: str) -> None:
        """The last committed shard's stats json names the (file, row range) pieces it was cut
        from: today's plan must cut it the same way (one read; works without dataset.json)."""
        manifest, size = ready.manifests[kind], self.cfg.samples_per_shard
        redo = ready.checks[kind].redo if kind in ready.checks else set()
        done = sorted(ready.store.committed(kind) - redo)
        if not done or manifest.count_rows() is None:
            return
        stats = ready.store.read_json(ready.store.shard_path(kind, done[-1], "json")) or {}
        if "pieces" not in stats:
            return
        was = [(p["file"], p["start"], p["stop"]) for p in stats["pieces"]]
        now = next(([(p.file, p.start, p.stop) for p in pieces] for index, _, pieces
                    in cut(manifest.plan_files(), size, done[-1] * size) if index == done[-1]), [])
        if was and was != now:
            file, start, stop = next((p for p in was if p not in now), was[0])
            ready.problems.append(
                f"{self.args.out}/{kind}/{done[-1]:06d} was cut from {file} rows {start}..{stop - 1}, but "
                "today's manifest files put other rows there: a manifest file changed since it was "
                "written. Restore it, write to another --out, or pass --overwrite to start again"
            )

    def _drop_partial_shards(self, ready: Ready) -> None:
        """Files were appended: the old partial last shard is redone whole. Its commit marker goes
        first, so a crash before the redo commits still leaves it to redo."""
        for kind, check in ready.checks.items():
            for index in sorted(check.redo):
                path = ready.store.shard_path(kind, index, "json")
                if ready.store.fs.exists(path):
                    ready.store.remove([path])
