"""Copy a model directory from S3 to a local directory: the init container of every serving pod.

    python -m kubeforge.runtime.fetch s3://bucket/models/llama /models/llama [--concurrency 16]
        [--tokenizer s3://bucket/tokenizers/llama | builtin:byte --tokenizer-dir /models/.tokenizer]

With --tokenizer (the spec's model.tokenizer) the tokenizer is materialised too, as a Hugging Face
tokenizer directory the engine is pointed at (`--tokenizer`): copied from S3 like the model, or written by
kubeforge for a built-in one (`builtin:byte`, the byte-level tokenizer of kubeforge.runtime.tinymodel).

Every object under the prefix is downloaded in parallel (s3transfer: ranged GETs for big shards, writes to
a temporary name and renames, so a file with its final name is complete). A file already present with the
object's size is kept, so a pod whose model volume outlives it (a hostPath or PVC node cache, or an
emptyDir across container restarts) starts without downloading again. Credentials and endpoint come from
the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL), as the operator renders them
from the model's secretRef. Failures exit non-zero with one clear line on stderr (and in the container's
termination message), which the operator shows in the InferenceDeployment's status. On success the
termination message carries the summary of the folder's kubeforge-provenance.json, which the operator shows
in the InferenceDeployment's status.model.provenance.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("kubeforge.fetch")

EXIT_FAILED = 1
EXIT_USAGE = 2


class FetchError(Exception):
    """The model could not be fetched; the message says why in one line."""


def plan(objects: list[tuple[str, int]], dest: Path) -> tuple[list[str], list[str]]:
    """(to download, already present) relative names, given (name, size) of the objects under the prefix."""
    todo, kept = [], []
    for name, size in objects:
        path = dest / name
        try:
            same = path.is_file() and path.stat().st_size == size
        except OSError:
            same = False
        (kept if same else todo).append(name)
    return todo, kept


BUILTIN_PREFIX = "builtin:"
# a Hugging Face model directory has this file; a tokenizer directory has one of the others
EXPECTED = {"model": ("config.json",), "tokenizer": ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                      "tokenizer.model")}


def fetch(uri: str, dest: str | os.PathLike[str], client: Any = None, concurrency: int = 16,
          what: str = "model") -> dict[str, int]:
    """Download s3 prefix `uri` into `dest`; returns counts {objects, downloaded, kept, bytes}."""
    from botocore.exceptions import BotoCoreError, ClientError

    from kubeforge.storage.s3 import S3Uri, download_files, list_objects, make_client, transfer_config

    try:
        src = S3Uri.parse(uri)
    except ValueError as e:
        raise FetchError(str(e)) from e
    root = Path(dest)
    try:
        client = client or make_client()
        objects = [
            (o["Key"][len(src.prefix):], int(o.get("Size", 0)))
            for o in list_objects(client, src)
            if "Key" in o and not o["Key"].endswith("/")
        ]
        objects = [(n, s) for n, s in objects if n]
        if not objects:
            raise FetchError(f"no objects under {uri} (wrong URI, or the {what} was not exported there)")
        names = {n for n, _ in objects}
        if not names & set(EXPECTED[what]):
            log.warning("%s has none of %s; is it a Hugging Face %s directory?", uri, ", ".join(EXPECTED[what]),
                        what)
        todo, kept = plan(objects, root)
        root.mkdir(parents=True, exist_ok=True)
        download_files(client, src, root, todo, transfer_config(concurrency=concurrency))
    except FetchError:
        raise
    except ClientError as e:
        err = e.response.get("Error", {})
        raise FetchError(f"S3 refused {uri}: {err.get('Code', '?')} {err.get('Message', '')}".strip()) from e
    except (BotoCoreError, OSError) as e:
        raise FetchError(f"cannot fetch {uri}: {type(e).__name__}: {e}") from e
    sizes = dict(objects)
    return {"objects": len(objects), "downloaded": len(todo), "kept": len(kept),
            "bytes": sum(sizes[n] for n in todo)}


def write_builtin_tokenizer(name: str, dest: str | os.PathLike[str]) -> None:
    """Write a tokenizer shipped with kubeforge as a Hugging Face tokenizer directory."""
    from .tinymodel import BUILTIN_TOKENIZERS

    if name not in BUILTIN_TOKENIZERS:
        raise FetchError(f"unknown built-in tokenizer {name!r} (known: {', '.join(sorted(BUILTIN_TOKENIZERS))})")
    try:
        BUILTIN_TOKENIZERS[name]().save_pretrained(str(dest))
    except OSError as e:
        raise FetchError(f"cannot write built-in tokenizer {name} to {dest}: {e}") from e


def fetch_tokenizer(source: str, dest: str | os.PathLike[str], concurrency: int = 16) -> str:
    """Materialise model.tokenizer (`s3://...` or `builtin:<name>`) in `dest`; returns a log line."""
    if source.startswith(BUILTIN_PREFIX):
        write_builtin_tokenizer(source[len(BUILTIN_PREFIX):], dest)
        return f"wrote built-in tokenizer {source} -> {dest}"
    counts = fetch(source, dest, concurrency=concurrency, what="tokenizer")
    return f"fetched tokenizer {source} -> {dest}: {counts['objects']} objects, {counts['downloaded']} downloaded"


def _termination_log(message: str) -> None:
    path = os.environ.get("KUBEFORGE_TERMINATION_LOG", "/dev/termination-log")
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(message[:4000])
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kubeforge.runtime.fetch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("uri", help="s3:// prefix of the model directory")
    p.add_argument("dest", help="local directory to fill")
    p.add_argument("--concurrency", type=int, default=16, help="parallel transfers")
    p.add_argument("--tokenizer", default=None, help="s3:// prefix of a tokenizer directory, or builtin:byte")
    p.add_argument("--tokenizer-dir", default=None, help="local directory for --tokenizer")
    a = p.parse_args(argv)
    if bool(a.tokenizer) != bool(a.tokenizer_dir):
        p.error("--tokenizer and --tokenizer-dir go together")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    t0 = time.monotonic()
    stage = "model"
    try:
        counts = fetch(a.uri, a.dest, concurrency=a.concurrency)
        log.info("fetched %s -> %s: %d objects, %d downloaded (%.1f MiB), %d already present, %.1fs",
                 a.uri, a.dest, counts["objects"], counts["downloaded"], counts["bytes"] / (1 << 20),
                 counts["kept"], time.monotonic() - t0)
        if a.tokenizer:
            stage = "tokenizer"
            log.info("%s", fetch_tokenizer(a.tokenizer, a.tokenizer_dir, a.concurrency))
    except FetchError as e:
        message = f"{stage} fetch failed: {e}"
        print(message, file=sys.stderr, flush=True)
        _termination_log(message)
        return EXIT_FAILED
    report = fetched_report(a.uri, a.dest)
    if report:
        _termination_log(report)
    return 0


def fetched_report(uri: str, dest: str | os.PathLike[str]) -> str:
    """The success message the operator reads from this container: the model folder's provenance summary
    (kubeforge-provenance.json), as JSON; empty when the folder has none."""
    import json

    from . import provenance

    prov = provenance.read(dest)
    if prov is None:
        return ""
    log.info("%s carries provenance: %s %s", uri, prov.get("kind"), prov.get("name"))
    return json.dumps({"uri": uri, "provenance": provenance.summary(prov)}, separators=(",", ":"))


if __name__ == "__main__":
    sys.exit(main())
