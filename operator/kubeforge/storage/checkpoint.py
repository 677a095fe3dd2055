"""Checkpoints in object storage with an atomic commit point.

Layout under the checkpoint URI (see DESIGN.md, "Object storage layout")::

    step-00001200/<shards...>       any files, uploaded in parallel (multipart for large ones)
    step-00001200/manifest.json     written LAST: files, sizes, sha256, step, tokens, time, meta
    step-00001200/manifest.rejected.json   a manifest whose bytes failed verification on restore (uncommitted)
    latest                          "step-00001200": a hint for humans and tools; never trusted
    final/                          Hugging Face export of the finished model

A step directory is *committed* when its manifest exists and every file it lists exists with the listed
size. A directory without a manifest is an interrupted upload and is never loaded; sha256s are checked on
download, so a file that was overwritten with the same size is caught there; such a step is *rejected*: its
manifest moves to manifest.rejected.json, so it is neither loaded nor counted by retention again.
`latest` never moves back past a step that is still committed.

The commit protocol itself (manifest last, validation, retention that removes the manifest first so a
half-deleted step never looks committed) is kubeforge's own; the bytes move through s3transfer.
"""

from __future__ import annotations

import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig

from . import s3
from .s3 import S3Uri, StorageError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
REJECTED = "manifest.rejected.json"
LATEST = "latest"
FINAL = "final"
FORMAT = "kubeforge.checkpoint/v1"
STEP_RE = re.compile(r"^step-(\d{8,})$")


class CorruptCheckpoint(StorageError):
    """A committed checkpoint whose bytes do not match its manifest."""


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the step directory, POSIX separators
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint as read from its manifest."""

    step: int
    uri: str  # s3:// URI of the step directory
    files: tuple[FileEntry, ...]
    tokens: int | None = None
    time: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @classmethod
    def from_manifest(cls, uri: str, m: dict[str, Any]) -> Checkpoint:
        files = tuple(FileEntry(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in m["files"])
        return cls(step=int(m["step"]), uri=uri, files=files, tokens=m.get("tokens"), time=m.get("time"),
                   meta=dict(m.get("meta") or {}))


def hash_files(local_dir: str | Path, names: list[str], workers: int = 8) -> list[FileEntry]:
    root = Path(local_dir)

    def one(n: str) -> FileEntry:
        p = root / n
        return FileEntry(n, p.stat().st_size, s3.sha256_file(p))

    with ThreadPoolExecutor(max(1, min(workers, len(names)))) as pool:
        return list(pool.map(one, names))


class CheckpointStore:
    """Checkpoints under one s3:// prefix."""

    def __init__(
        self,
        uri: str,
        client: Any | None = None,
        transfer_config: TransferConfig | None = None,
        concurrency: int = s3.DEFAULT_CONCURRENCY,
    ) -> None:
        self.root = S3Uri.parse(uri)
        self.client = client if client is not None else s3.make_client(max_pool_connections=4 * concurrency)
        self.transfer_config = transfer_config or s3.transfer_config(concurrency=concurrency)
        self.concurrency = concurrency

    # -------------------------------------------------------------------------------------- naming
    @property
    def uri(self) -> str:
        return str(self.root)

    def step_uri(self, step: int) -> S3Uri:
        return self.root.join(step_name(step))

    @property
    def final_uri(self) -> S3Uri:
        return self.root.join(FINAL)

    # -------------------------------------------------------------------------------------- writing
    def upload_files(self, local_dir: str | Path, step: int, names: list[str] | None = None) -> list[FileEntry]:
        """Upload files of a step (all under local_dir by default) WITHOUT committing; returns their entries.

        Each rank of a gang calls this for the shards it wrote, then one rank calls commit() with all entries.
        """
        names = s3.local_files(local_dir) if names is None else sorted(names)
        if MANIFEST in names:
            raise StorageError(f"{MANIFEST} is reserved for the commit record")
        entries = hash_files(local_dir, names, self.concurrency)
        s3.upload_files(self.client, local_dir, self.step_uri(step), names, self.transfer_config)
        return entries

    def commit(
        self, step: int, files: list[FileEntry], tokens: int | None = None, meta: dict[str, Any] | None = None
    ) -> Checkpoint:
        """Write the manifest (the commit point) after checking the files are there, then the latest hint."""
        names = [f.path for f in files]
        if len(set(names)) != len(names):
            raise StorageError(f"duplicate file entries in step {step}")
        present = self._listing(self.step_uri(step))
        missing = [f.path for f in files if present.get(f.path) != f.size]
        if missing:
            raise StorageError(f"step {step}: {len(missing)} files missing or short before commit: {missing[:5]}")
        manifest = {
            "format": FORMAT,
            "step": step,
            "tokens": tokens,
            "time": now_rfc3339(),
            "files": [f.to_json() for f in sorted(files, key=lambda f: f.path)],
            "meta": meta or {},
        }
        uri = self.step_uri(step)
        s3.put_bytes(self.client, uri.join(MANIFEST), json.dumps(manifest, indent=1).encode(), "application/json")
        try:
            self._advance_latest(step)
        except Exception as exc:  # noqa: BLE001 - the pointer is a hint; the manifest is the commit
            log.warning("could not update %s/latest: %s", self.root, exc)
        return Checkpoint.from_manifest(str(uri), manifest)

    def _advance_latest(self, step: int) -> None:
        """Point `latest` at `step`, unless it names a newer step that is still committed."""
        hint = self.latest_hint()
        if hint is not None and hint > step and self.read_manifest(hint) is not None:
            log.info("latest stays at step %d (committed, newer than %d)", hint, step)
            return
        s3.put_bytes(self.client, self.root.join(LATEST), (step_name(step) + "\n").encode(), "text/plain")

    def reject(self, step: int, reason: str) -> None:
        """Uncommit a step whose bytes do not match its manifest, keeping the manifest (and why) beside it."""
        uri = self.step_uri(step)
        m = self.read_manifest(step)
        if m is None:
            return
        m["rejected"] = {"reason": reason, "time": now_rfc3339()}
        s3.put_bytes(self.client, uri.join(REJECTED), json.dumps(m, indent=1).encode(), "application/json")
        s3.delete_keys(self.client, self.root.bucket, [uri.join(MANIFEST).key])
        log.warning("checkpoint step %d rejected: %s", step, reason)

    def rejected_steps(self) -> list[int]:
        """Steps rejected on restore (and not committed again since)."""
        dirs = self.step_dirs()
        return sorted(s for s, files in dirs.items() if REJECTED in files and MANIFEST not in files)

    def save_dir(
        self, local_dir: str | Path, step: int, meta: dict[str, Any] | None = None, tokens: int | None = None
    ) -> Checkpoint:
        """Upload every file under local_dir as step `step`, then commit it."""
        meta = dict(meta or {})
        if tokens is None and isinstance(meta.get("tokens"), int):
            tokens = meta.pop("tokens")
        entries = self.upload_files(local_dir, step)
        return self.commit(step, entries, tokens=tokens, meta=meta)

    # -------------------------------------------------------------------------------------- reading
    def _listing(self, uri: S3Uri) -> dict[str, int]:
        """relative path -> size of every object under uri."""
        return {o["Key"][len(uri.prefix):]: int(o["Size"]) for o in s3.list_objects(self.client, uri)
                if "Key" in o}

    def step_dirs(self) -> dict[int, dict[str, int]]:
        """Every step directory (committed or not) -> {relative path: size}, from one listing."""
        out: dict[int, dict[str, int]] = {}
        for o in s3.list_objects(self.client, self.root):
            if "Key" not in o:
                continue
            rel = o["Key"][len(self.root.prefix):]
            top, sep, rest = rel.partition("/")
            m = STEP_RE.match(top)
            if m and sep:
                out.setdefault(int(m.group(1)), {})[rest] = int(o["Size"])
        return out

    def read_manifest(self, step: int) -> dict[str, Any] | None:
        try:
            raw = s3.get_bytes(self.client, self.step_uri(step).join(MANIFEST))
        except s3.ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        try:
            m = json.loads(raw)
            if m.get("format") != FORMAT or int(m["step"]) != step or not isinstance(m["files"], list):
                raise ValueError("unexpected manifest shape")
            return m
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable manifest of step %d: %s", step, exc)
            return None

    def _validate(self, step: int, listing: dict[str, int]) -> Checkpoint | None:
        if MANIFEST not in listing:
            return None
        m = self.read_manifest(step)
        if m is None:
            return None
        ckpt = Checkpoint.from_manifest(str(self.step_uri(step)), m)
        bad = [f.path for f in ckpt.files if listing.get(f.path) != f.size]
        if bad:
            log.warning("step %d has a manifest but %d files are missing or have the wrong size (%s); skipped",
                        step, len(bad), bad[:3])
            return None
        return ckpt

    def committed_checkpoints(self) -> list[Checkpoint]:
        """All committed checkpoints, oldest first."""
        dirs = self.step_dirs()
        out = [c for s in sorted(dirs) if (c := self._validate(s, dirs[s])) is not None]
        return out

    def latest_committed_checkpoint(self) -> Checkpoint | None:
        """The newest step whose manifest exists and whose files all exist with the listed sizes."""
        dirs = self.step_dirs()
        for s in sorted(dirs, reverse=True):
            ckpt = self._validate(s, dirs[s])
            if ckpt is not None:
                return ckpt
            if MANIFEST not in dirs[s]:
                log.info("step %d has no manifest (interrupted upload); skipped", s)
        return None

    def latest_hint(self) -> int | None:
        """The step named by the `latest` pointer, if any (not validated)."""
        try:
            raw = s3.get_bytes(self.client, self.root.join(LATEST)).decode().strip()
        except s3.ClientError:
            return None
        m = STEP_RE.match(raw)
        return int(m.group(1)) if m else None

    def download(
        self, step: int | Checkpoint, local_dir: str | Path, verify: bool = True
    ) -> Checkpoint:
        """Download a committed checkpoint into local_dir, verifying every file's size and sha256."""
        if isinstance(step, Checkpoint):
            ckpt = step
        else:
            m = self.read_manifest(step)
            if m is None:
                raise StorageError(f"step {step} under {self.root} is not committed")
            ckpt = Checkpoint.from_manifest(str(self.step_uri(step)), m)
        local = Path(local_dir)
        local.mkdir(parents=True, exist_ok=True)
        names = [f.path for f in ckpt.files]
        s3.download_files(self.client, self.step_uri(ckpt.step), local, names, self.transfer_config)
        if verify:
            got = hash_files(local, names, self.concurrency)
            bad = [(w.path, w.sha256[:12], g.sha256[:12]) for w, g in zip(ckpt.files, got, strict=True)
                   if w.sha256 != g.sha256 or w.size != g.size]
            if bad:
                raise CorruptCheckpoint(f"step {ckpt.step}: {len(bad)} files do not match the manifest: {bad[:3]}")
        return ckpt

    # -------------------------------------------------------------------------------------- retention
    def apply_retention(self, keep: int) -> list[int]:
        """Delete committed steps beyond the newest `keep`, and uncommitted steps older than the newest
        committed one (leftovers of interrupted uploads). Uncommitted steps newer than that may be uploads
        in flight and are left alone. Returns the deleted steps."""
        if keep < 1:
            raise ValueError("keep must be >= 1")
        dirs = self.step_dirs()
        committed = [s for s in sorted(dirs) if self._validate(s, dirs[s]) is not None]
        if not committed:
            return []
        newest = committed[-1]
        doomed = set(committed[:-keep]) | {s for s in dirs if s not in committed and s < newest}
        for s in sorted(doomed):
            prefix = self.step_uri(s)
            keys = [prefix.join(p).key for p in dirs[s]]
            manifest_key = prefix.join(MANIFEST).key
            if manifest_key in keys:  # uncommit first, so a half-deleted step is never taken as committed
                s3.delete_keys(self.client, self.root.bucket, [manifest_key])
                keys.remove(manifest_key)
            s3.delete_keys(self.client, self.root.bucket, keys)
            log.info("retention: deleted %s", prefix)
        return sorted(doomed)

    # -------------------------------------------------------------------------------------- final export
    def upload_final(self, local_dir: str | Path) -> str:
        """Upload a Hugging Face model directory to <uri>/final/ and drop objects there from older exports."""
        dest = self.final_uri
        old = {o["Key"] for o in s3.list_objects(self.client, dest) if "Key" in o}
        names = s3.upload_dir(self.client, local_dir, dest, self.transfer_config)
        stale = sorted(old - {dest.join(n).key for n in names})
        if stale:
            s3.delete_keys(self.client, dest.bucket, stale)
        return str(dest)

    def download_final(self, local_dir: str | Path) -> list[str]:
        return s3.download_dir(self.client, self.final_uri, local_dir, self.transfer_config)

