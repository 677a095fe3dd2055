"""Streaming, packed, resumable training data from an s3:// prefix.

- Objects under `data.uri` (or the single object it names), in an order shuffled per epoch with
  `data.shuffleSeed` (the same seed replays the same order on resume). The shuffle sorts objects by a keyed
  hash of their name, so objects added under `data.uri` take their own places in the order without moving
  the others: a resume continues in the object it was reading (the state names it), and an added object
  that sorts before it is read from the next epoch on.
- Records: one JSON line (`format: jsonl`, text in `data.textField`), or one paragraph (`format: text`:
  lines up to a blank line; a file without blank lines is one document). Each record is a document.
- Sharding: plain JSON-lines objects by bytes: rank r of W reads the records that start in bytes
  [size*r/W, size*(r+1)/W) of each object (a ranged GET from just before its range, skipping the record
  that started in the previous one), so the gang reads each byte about once. Paragraph text and compressed
  objects (whose boundaries cannot be found from an arbitrary byte) by the running record index of the
  epoch modulo the world. Either way no record is used twice in an epoch.
- Packing: documents are tokenized, an EOS appended to each, concatenated, and cut into sequences of
  seqLen+1 tokens that overlap by one (the last target of one sequence is the first input of the next).
- Resume: the state (epoch, object key, byte offset, record index, tokens not yet emitted) after the last
  sequence *consumed* is part of every checkpoint; a restarted stream reads objects from that byte offset
  with ranged GETs and produces exactly the sequences that would have come next. At another world size
  every rank restarts at the start of the earliest saved object with the new sharding, and the old ranks'
  buffered tokens are handed to the new ranks first (some records are seen again, none is skipped).
- Compressed objects (`.gz`, multi-member included, and `.zst`, the usual forms of published corpora) are
  decompressed while streaming; their offsets count decompressed bytes, so a resume reads such an object
  from its start and skips to the offset (no ranged GET can land inside a compressed stream). Between
  refills the open stream of the current object is kept and continued, so a pass reads each object once.

Written by hand because no library streams S3 objects by byte offset with resumable packing state; the
GETs themselves are boto3 (with its retries) and a broken body stream is reopened at the current offset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from ..storage import s3 as s3mod
from ..storage.s3 import S3Uri
from .training import InvalidSpec

log = logging.getLogger(__name__)

Tokenize = Callable[[list[str]], list[list[int]]]


class S3Objects:
    """The data objects under an s3:// prefix and byte-offset reads of them."""

    def __init__(self, client: Any, uri: str) -> None:
        self.client = client
        self.uri = S3Uri.parse(uri)

    def list(self) -> list[tuple[str, int]]:
        objs = [(o["Key"], int(o["Size"])) for o in s3mod.list_objects(self.client, self.uri) if "Key" in o]
        if not objs and self.uri.key:  # the URI names a single object
            try:
                head = s3mod.retry(lambda: self.client.head_object(Bucket=self.uri.bucket, Key=self.uri.key),
                                   what=f"HEAD {self.uri}")
                objs = [(self.uri.key, int(head["ContentLength"]))]
            except s3mod.ClientError:
                objs = []
        out = []
        for key, size in objs:
            base = key.rsplit("/", 1)[-1]
            if size > 0 and base and not base.startswith((".", "_")):
                out.append((key, size))
        return sorted(out)

    def read(self, key: str, offset: int, size: int, chunk: int = 1 << 20) -> Iterator[bytes]:
        """Bytes of an object from `offset`; a stream that breaks is reopened where it stopped."""
        pos, failures = offset, 0
        while pos < size:
            try:
                body = self.client.get_object(Bucket=self.uri.bucket, Key=key, Range=f"bytes={pos}-")["Body"]
                for block in body.iter_chunks(chunk):
                    pos += len(block)
                    failures = 0
                    yield block
                return
            except Exception as exc:  # noqa: BLE001
                failures += 1
                if failures > 5 or not s3mod.is_transient(exc):
                    raise
                log.warning("reading s3://%s/%s at %d failed (%s); reopening", self.uri.bucket, key, pos, exc)
                time.sleep(min(10.0, 0.5 * 2 ** failures))


def _gunzip(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Decompress gzip data, including concatenated members (pigz, bgzip, appended files)."""
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    for block in chunks:
        while block:
            out = d.decompress(block)
            if out:
                yield out
            if not d.eof:
                break
            block = d.unused_data  # the next member starts here
            d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    tail = d.flush()
    if tail:
        yield tail


def _unzstd(chunks: Iterable[bytes]) -> Iterator[bytes]:
    try:
        import zstandard
    except ImportError as exc:
        raise InvalidSpec(".zst data needs the zstandard package (kubeforge[train])", "spec.data.uri") from exc
    d = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True)
    for block in chunks:
        out = d.decompress(block)
        if out:
            yield out


# object name suffix -> streaming decompressor
DECOMPRESSORS: dict[str, Callable[[Iterable[bytes]], Iterator[bytes]]] = {".gz": _gunzip, ".zst": _unzstd}


def _skip(blocks: Iterable[bytes], n: int) -> Iterator[bytes]:
    """The blocks without their first n bytes."""
    for block in blocks:
        if n >= len(block):
            n -= len(block)
            continue
        yield block[n:] if n else block
        n = 0


@dataclass
class StreamState:
    epoch: int = 0
    file_pos: int = 0  # index into the epoch's file order (a hint: `key` is what a resume trusts)
    key: str = ""  # the object at file_pos, "" before the first read
    offset: int = 0  # byte offset in that file of the next unread record
    record: int = 0  # running record index within the epoch (for sharding)
    epoch_tokens: int = 0  # tokens this rank produced in this epoch (detects an empty shard)
    buffer: list[int] = field(default_factory=list)  # tokenized, not yet emitted

    def position(self) -> tuple[int, int, int]:
        return (self.epoch, self.file_pos, self.offset)


def _lines(chunks: Iterator[bytes], start: int) -> Iterator[tuple[bytes, int]]:
    """(line without newline, byte offset just after it) for each line of a byte stream."""
    pending = bytearray()
    pos = start
    for block in chunks:
        pending += block
        begin = 0
        while (i := pending.find(b"\n", begin)) >= 0:
            pos += i + 1 - begin
            yield bytes(pending[begin:i]), pos
            begin = i + 1
        del pending[:begin]
    if pending:
        yield bytes(pending), pos + len(pending)


class PackedStream:
    """This rank's packed training sequences; see the module docstring."""

    def __init__(
        self,
        source: S3Objects,
        tokenize: Tokenize,
        eos_id: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_seed: int = 0,
        fmt: str = "jsonl",
        text_field: str = "text",
        batch_records: int = 64,
    ) -> None:
        self.source = source
        self.tokenize = tokenize
        self.eos_id = eos_id
        self.seq_len = seq_len
        self.rank = rank
        self.world_size = world_size
        self.shuffle_seed = shuffle_seed
        self.fmt = fmt
        self.text_field = text_field
        self.batch_records = batch_records
        self.files = source.list()
        if not self.files:
            raise InvalidSpec(f"no data objects under {source.uri}", "spec.data.uri")
        self.state = StreamState()
        self.bad_records = 0
        # the suspended record reader of the object being read: ((epoch, key, offset it stands at), reader)
        self._reader: tuple[tuple[int, str, int], Iterator[tuple[str | None, int]]] | None = None

    # ------------------------------------------------------------------------------------ ordering
    def order(self, epoch: int) -> list[tuple[str, int]]:
        """The epoch's objects, sorted by a keyed hash of their names (relative to data.uri, without the
        compression suffix): a shuffle in which adding an object moves no other."""
        return sorted(self.files, key=lambda item: self.order_rank(epoch, item[0]))

    def order_rank(self, epoch: int, key: str) -> tuple[bytes, str]:
        prefix = self.source.uri.prefix
        name = key[len(prefix):] if key.startswith(prefix) else key
        name = next((name[: -len(x)] for x in DECOMPRESSORS if name.endswith(x)), name)
        return hashlib.sha256(f"{self.shuffle_seed}:{epoch}:{name}".encode()).digest(), key

    # ------------------------------------------------------------------------------------ records
    def _records(self, key: str, size: int, offset: int) -> Iterator[tuple[str | None, int]]:
        """(document text or None for an unusable record, offset after the record) from `offset` on; offsets
        of compressed objects count decompressed bytes."""
        decompress = next((f for suffix, f in DECOMPRESSORS.items() if key.endswith(suffix)), None)
        if decompress is not None:
            lines = _lines(_skip(decompress(self.source.read(key, 0, size)), offset), offset)
        elif self.byte_sharded(key):
            lines = self._slice_lines(key, size, offset)
        else:
            lines = _lines(self.source.read(key, offset, size), offset)
        if self.fmt == "jsonl":
            for raw, end in lines:
                if not raw.strip():
                    continue
                try:
                    text = json.loads(raw)[self.text_field]
                    yield (text if isinstance(text, str) and text else None), end
                except (ValueError, KeyError, TypeError):
                    yield None, end
            return
        para: list[str] = []
        end = offset
        for raw, end in lines:
            line = raw.decode("utf-8", errors="replace")
            if line.strip():
                para.append(line)
            elif para:
                yield "\n".join(para), end
                para = []
        if para:
            yield "\n".join(para), end

    def byte_sharded(self, key: str) -> bool:
        """Whether this rank reads only its own byte range of the object (plain JSON lines: a record starts
        after any newline), rather than every record and keeping those whose index is its own."""
        return self.world_size > 1 and self.fmt == "jsonl" and not any(key.endswith(x) for x in DECOMPRESSORS)

    def _slice_lines(self, key: str, size: int, offset: int) -> Iterator[tuple[bytes, int]]:
        """The lines of this rank's records: those that start in [size*r/W, size*(r+1)/W); the last one may
        end past that. `offset` 0 means the start of the slice, found after the first newline before it."""
        lo, hi = size * self.rank // self.world_size, size * (self.rank + 1) // self.world_size
        if offset == 0 and lo > 0:
            blocks = self.source.read(key, lo - 1, size)
            start = lo - 1
            rest = b""
            for block in blocks:  # skip the tail of the record that started in the previous slice
                i = block.find(b"\n")
                if i >= 0:
                    start += i + 1
                    rest = block[i + 1:]
                    break
                start += len(block)
            else:
                return

            def chained() -> Iterator[bytes]:
                if rest:
                    yield rest
                yield from blocks

            chunks: Iterator[bytes] = chained()
        else:
            start = offset
            chunks = self.source.read(key, start, size) if start < hi else iter(())
        for raw, end in _lines(chunks, start):
            if start >= hi:
                return
            yield raw, end
            start = end

    def _fill(self) -> None:
        """Tokenize this rank's next records into the buffer, advancing the state past them."""
        st = self.state
        order = self.order(st.epoch)
        if st.file_pos >= len(order):
            if st.epoch_tokens == 0:
                raise InvalidSpec(
                    f"data under {self.source.uri} yielded no tokens for rank {self.rank} of "
                    f"{self.world_size} in a whole pass (empty files, wrong textField or format?)",
                    "spec.data")
            st.epoch, st.file_pos, st.offset, st.record, st.epoch_tokens = st.epoch + 1, 0, 0, 0, 0
            log.info("data: starting epoch %d", st.epoch)
            return
        key, size = order[st.file_pos]
        st.key = key
        mine: list[str] = []
        record, offset, done = st.record, st.offset, False
        if self._reader is not None and self._reader[0] == (st.epoch, key, st.offset):
            reader = self._reader[1]  # continue the open stream: no second GET, no re-decompression
        else:
            reader = self._records(key, size, st.offset)
        self._reader = None
        sharded = self.byte_sharded(key)
        for text, end in reader:
            if sharded or record % self.world_size == self.rank:
                if text is None:
                    self.bad_records += 1
                    if self.bad_records <= 3:
                        log.warning("data: skipping a record in %s without a %r string", key, self.text_field)
                else:
                    mine.append(text)
            record, offset = record + 1, end
            if len(mine) >= self.batch_records:
                break
        else:  # end of the object
            done = True
        if mine:
            ids = self.tokenize(mine)
            added = 0
            for doc in ids:
                st.buffer.extend(doc)
                st.buffer.append(self.eos_id)
                added += len(doc) + 1
            st.epoch_tokens += added
        st.record = record
        if done:
            st.file_pos, st.offset, st.key = st.file_pos + 1, 0, ""
        else:
            st.offset = offset
            self._reader = ((st.epoch, key, offset), reader)

    def next_sequence(self) -> list[int]:
        n = self.seq_len + 1
        while len(self.state.buffer) < n:
            self._fill()
        seq = self.state.buffer[:n]
        del self.state.buffer[: self.seq_len]
        return seq

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_sequence()

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return asdict(self.state) | {"world_size": self.world_size, "rank": self.rank}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.state = StreamState(**{k: d[k] for k in StreamState.__dataclass_fields__ if k in d})
        self.state.buffer = list(self.state.buffer)
        self._reader = None
        self._locate()

    def _locate(self) -> None:
        """Point file_pos at the saved object: the listing may have changed since the state was saved."""
        st = self.state
        if not st.key:
            return
        keys = [k for k, _ in self.order(st.epoch)]
        if st.file_pos < len(keys) and keys[st.file_pos] == st.key:
            return
        if st.key in keys:
            log.warning("data: objects under %s changed since the checkpoint; resuming in %s at offset %d",
                        self.source.uri, st.key, st.offset)
            st.file_pos = keys.index(st.key)
            return
        # the object being read is gone: its unread records cannot be had; go on with the next object in order
        gone = self.order_rank(st.epoch, st.key)
        later = [i for i, k in enumerate(keys) if self.order_rank(st.epoch, k) > gone]
        log.warning("data: %s (being read at the checkpoint) no longer exists under %s; continuing with the "
                    "next object", st.key, self.source.uri)
        st.file_pos, st.offset, st.key = (later[0] if later else len(keys)), 0, ""

    def load_gang_state(self, states: dict[int, dict[str, Any]]) -> None:
        """Restore from the saved states of every rank. Same world size: each rank continues its own stream
        exactly. Different world size: every rank restarts at the earliest saved position with the new
        sharding (some records are seen again, none is skipped)."""
        if not states:
            return
        saved_world = int(next(iter(states.values())).get("world_size", len(states)))
        if saved_world == self.world_size and self.rank in states:
            self.load_state_dict(states[self.rank])
            return
        earliest = min(states.values(), key=lambda s: (s["epoch"], s["file_pos"], s["offset"]))
        log.warning("data: world size changed %d -> %d; resuming every rank at epoch %d file %d offset %d",
                    saved_world, self.world_size, earliest["epoch"], earliest["file_pos"], earliest["offset"])
        # tokens the old ranks had read but not emitted: old rank r's go to new rank r mod world size, first
        # (without their first token, which was also the last target the old rank emitted)
        inherited = [t for r in sorted(states) if r % self.world_size == self.rank
                     for t in list(states[r].get("buffer") or [])[1:]]
        # the earliest object from its start: its byte ranges and record indices are the old world's
        self.load_state_dict(dict(earliest, offset=0, record=0, buffer=inherited, epoch_tokens=1))


class Prefetcher:
    """Produces batches of sequences on a background thread; state_dict() is the stream state after the
    last batch *handed out*, so a checkpoint never skips prefetched-but-unused data."""

    def __init__(self, stream: PackedStream, batch_size: int, depth: int = 4) -> None:
        self.stream = stream
        self.batch_size = batch_size
        self.q: queue.Queue[tuple[Any, dict[str, Any]] | BaseException] = queue.Queue(depth)
        self._state = stream.state_dict()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="data-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import torch

        try:
            while not self._stop.is_set():
                seqs = [self.stream.next_sequence() for _ in range(self.batch_size)]
                item = (torch.tensor(seqs, dtype=torch.long), self.stream.state_dict())
                while not self._stop.is_set():
                    try:
                        self.q.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self.q.put(exc)

    def next(self) -> Any:
        item = self.q.get()
        if isinstance(item, BaseException):
            raise item
        batch, self._state = item
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self._state

    def close(self, timeout: float = 5.0) -> None:
        """Stop the producer and wait for it, so no thread runs torch code while the interpreter exits."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self.q.get_nowait()  # unblock a producer waiting on a full queue
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)
            timeout -= 0.05
            if timeout <= 0:
                break
