"""Corpus -> token ids on disk, and random training windows out of them.

Each source is tokenized once into ``gptlab_home()/tokens/<key>/``:

* ``shards/NNNNN.bin``: the ids of one chunk of the corpus (gptlab.data.corpus.plan_chunks: ~64 MB of
  text, a compressed file, or a few Parquet row groups), every document followed by the end-of-text
  id, as raw uint16 (vocab <= 65535) or uint32, read back through ``np.memmap`` so corpora larger
  than memory work; ``shards/NNNNN.json`` beside it, written after it, marks the shard whole;
* ``meta.json``: counts, dtype, the shards and the split point, written last (its presence marks a
  whole cache).

Chunks are encoded in parallel worker processes (``workers``, default one per CPU core), each in
constant memory (~4M characters at a time), with a progress bar over the corpus bytes. A run that
stops half-way (Ctrl-C, a crash, a killed job) keeps its finished shards, and the next run with the
same source and tokenizer encodes only the missing ones: tokenisation is resumable.

``<key>`` is a sha256 of the source's contents, the tokenizer (its full JSON) and the split settings,
so changed text or a different tokenizer gets a new folder, and an unchanged one is reused. Caching
per source (not per mix) means ``--data shakespeare`` is tokenized once however it is mixed.

Split: the last ``val_fraction`` of each source's token stream is validation, the rest training.
Cutting the stream (not a random set of documents) keeps a single-file corpus splittable and makes
the split independent of any seed; windows are drawn inside one side, never across the cut.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from gptlab.data.corpus import CHUNK_BYTES, Chunk, Source, chunk_documents, parse_sources, plan_chunks
from gptlab.errors import GptlabError
from gptlab.io import atomic_open, atomic_write_json, gptlab_home

if TYPE_CHECKING:   # torch is imported where batches are made: tokenizing workers never load it
    import torch

# 2: pieces cut only at lone newlines (exactly the ids of whole-text encoding); 3: sharded by chunk
CACHE_VERSION = 3
_PIECE_CHARS = 1 << 16          # cut documents into ~64K-char pieces so encode_batch runs in parallel
_BATCH_CHARS = 1 << 22          # ...and encode ~4M chars per call to bound memory
_PROGRESS_MIN_BYTES = 16 << 20  # no progress bar for small corpora
# A lone newline between two non-space characters is always a pre-token boundary for our tokenizers
# (GPT-2 split pattern, or one piece per character), so cutting there changes no ids.
_CUT = re.compile(r"(?<=\S)\n(?=\S)")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def _pieces(doc: str) -> Iterator[str]:
    start = 0
    while len(doc) - start > _PIECE_CHARS:
        m = _CUT.search(doc, start + _PIECE_CHARS)
        if not m:
            break
        yield doc[start:m.end()]
        start = m.end()
    yield doc[start:]


def _tokenizer_sha(tok) -> str:
    return hashlib.sha256(tok.hf.to_str().encode("utf-8")).hexdigest()


def _encode_chunk(chunk: Chunk, tok, dtype: np.dtype, f) -> tuple[int, int]:
    """Write the ids of ``chunk`` to open file ``f``; returns (num_tokens, num_documents)."""
    n_tokens = n_docs = 0
    pieces: list[str] = []
    ends: list[bool] = []   # does pieces[i] end a document (then the EOT id follows it)
    size = 0

    def flush() -> int:
        ids = tok.encode_batch(pieces)
        parts = []
        for piece_ids, end in zip(ids, ends):
            parts.append(np.asarray(piece_ids, dtype=dtype))
            if end:
                parts.append(np.asarray([tok.eot_id], dtype=dtype))
        arr = np.concatenate(parts) if parts else np.zeros(0, dtype)
        f.write(arr.tobytes())
        pieces.clear(), ends.clear()
        return len(arr)

    for doc, ends_doc in chunk_documents(chunk):
        if not doc:
            continue   # empty documents are skipped, as Source.documents() does
        n_docs += ends_doc
        doc_pieces = list(_pieces(doc))
        for i, p in enumerate(doc_pieces):
            pieces.append(p)
            ends.append(ends_doc and i == len(doc_pieces) - 1)
            size += len(p)
            if size >= _BATCH_CHARS:
                n_tokens += flush()
                size = 0
    if pieces:
        n_tokens += flush()
    return n_tokens, n_docs


def _write_shard(chunk: Chunk, tok, dtype: np.dtype, folder: Path, index: int) -> dict:
    """Encode one chunk into shards/NNNNN.bin, then record it in NNNNN.json (the mark of a whole shard)."""
    name = f"{index:05d}"
    with atomic_open(folder / f"{name}.bin") as f:
        n_tokens, n_docs = _encode_chunk(chunk, tok, dtype, f)
    rec = {"file": f"{name}.bin", "tokens": n_tokens, "documents": n_docs, "chunk": asdict(chunk)}
    atomic_write_json(folder / f"{name}.json", rec)
    return rec


_WORKER_TOKENIZERS: dict = {}


def _worker_shard(tok_json: str, chunk: Chunk, dtype: str, folder: str, index: int) -> dict:
    """A worker process's job: rebuild the tokenizer once per process, encode one chunk."""
    from tokenizers import Tokenizer as HFTokenizer
    from gptlab.tokenizer import Tokenizer
    key = hashlib.sha256(tok_json.encode()).hexdigest()
    if key not in _WORKER_TOKENIZERS:
        _WORKER_TOKENIZERS[key] = Tokenizer(HFTokenizer.from_str(tok_json))
    return _write_shard(chunk, _WORKER_TOKENIZERS[key], np.dtype(dtype), Path(folder), index)


def _one_thread_each() -> None:
    # N processes x N tokenizer threads would oversubscribe the cores: one thread per process.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _finished_shard(folder: Path, index: int, chunk: Chunk, dtype: np.dtype) -> dict | None:
    try:
        rec = json.loads((folder / f"{index:05d}.json").read_text(encoding="utf-8"))
        size = (folder / rec["file"]).stat().st_size
    except (OSError, ValueError, KeyError):
        return None
    if rec.get("chunk") != asdict(chunk) or size != rec["tokens"] * dtype.itemsize:
        return None
    return rec


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 16))


def _encode_source(source: Source, tok, dtype: np.dtype, folder: Path, progress: bool,
                   workers: int | None, chunk_bytes: int) -> list[dict]:
    """Every chunk of ``source`` as a shard in ``folder``; finished shards of an earlier run are kept."""
    chunks = plan_chunks(source.files(), chunk_bytes)
    folder.mkdir(parents=True, exist_ok=True)
    done = {i: r for i, c in enumerate(chunks) if (r := _finished_shard(folder, i, c, dtype)) is not None}
    todo = [i for i in range(len(chunks)) if i not in done]
    total = sum(c.size for c in chunks)
    bar = tqdm(total=total, initial=sum(chunks[i].size for i in done), unit="B", unit_scale=True,
               desc=f"tokenizing {source.name}", disable=not progress or total < _PROGRESS_MIN_BYTES)
    workers = min(workers or default_workers(), len(todo))
    if workers <= 1:
        for i in todo:   # in this process: small corpora pay no process start-up
            done[i] = _write_shard(chunks[i], tok, dtype, folder, i)
            bar.update(chunks[i].size)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        # spawn, not fork: a forked copy of a process that has run the tokenizer's thread pool (or
        # torch's) can deadlock.
        ctx = multiprocessing.get_context("spawn")
        tok_json = tok.hf.to_str()
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_one_thread_each) as pool:
            jobs = {pool.submit(_worker_shard, tok_json, chunks[i], dtype.name, str(folder), i): i for i in todo}
            try:
                for job in as_completed(jobs):
                    done[jobs[job]] = job.result()
                    bar.update(chunks[jobs[job]].size)
            except BaseException:
                for job in jobs:
                    job.cancel()
                raise
    bar.close()
    return [done[i] for i in range(len(chunks))]


class _Shards:
    """Several memmapped shard files read as one token stream (slices may span shards)."""

    def __init__(self, arrays: list[np.ndarray], dtype: np.dtype):
        self.arrays, self.dtype = arrays, dtype
        self.starts = np.cumsum([0] + [len(a) for a in arrays])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("token streams are read by contiguous slices")
        a, b, _ = key.indices(len(self))
        first = int(np.searchsorted(self.starts, a, side="right")) - 1
        out, i = [], max(first, 0)
        while a < b and i < len(self.arrays):
            lo = a - self.starts[i]
            take = min(b - a, len(self.arrays[i]) - lo)
            if take > 0:
                out.append(self.arrays[i][lo:lo + take])
                a += take
            i += 1
        return np.concatenate(out) if out else np.zeros(0, self.dtype)

    def tolist(self) -> list[int]:
        return self[:].tolist()


@dataclass
class _Part:
    """One source's cache: tokens [0, split_at) are train, [split_at, num_tokens) are val."""
    source: Source
    folder: Path
    meta: dict
    reused: bool
    _mm: "np.memmap | _Shards | None" = field(default=None, repr=False)

    @property
    def tokens(self) -> np.ndarray | _Shards:
        """The whole token stream: one memmap, or the shards' memmaps read as one."""
        if self._mm is None:
            dtype = np.dtype(self.meta["dtype"])
            arrays = [np.memmap(self.folder / "shards" / s["file"], dtype=dtype, mode="r") if s["tokens"]
                      else np.zeros(0, dtype) for s in self.meta["shards"]]
            self._mm = arrays[0] if len(arrays) == 1 else _Shards(arrays, dtype)
        return self._mm

    def span(self, split: str) -> tuple[int, int]:
        cut = self.meta["split_at"]
        return (0, cut) if split == "train" else (cut, self.meta["num_tokens"])


def _load_valid(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("version") != CACHE_VERSION:
            return None
        item = np.dtype(meta["dtype"]).itemsize
        if any((folder / "shards" / s["file"]).stat().st_size != s["tokens"] * item for s in meta["shards"]):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta


def _prepare_part(source: Source, tok, tok_sha: str, val_fraction: float, root: Path,
                  progress: bool, workers: int | None = None, chunk_bytes: int = CHUNK_BYTES) -> _Part:
    settings = {"version": CACHE_VERSION, "content_sha256": source.fingerprint(),
                "tokenizer_sha256": tok_sha, "val_fraction": val_fraction, "split": "tail",
                "chunk_bytes": chunk_bytes}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]
    folder = root / key
    meta = _load_valid(folder)
    if meta is not None:
        return _Part(source, folder, meta, reused=True)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tok.vocab_size)
    t0 = time.time()
    shards = _encode_source(source, tok, dtype, folder / "shards", progress, workers, chunk_bytes)
    n_tokens, n_docs = sum(s["tokens"] for s in shards), sum(s["documents"] for s in shards)
    if n_docs == 0:
        raise GptlabError(f"--data {source.spec}: empty corpus (no text in {source.resolve()})")
    n_val = int(round(n_tokens * val_fraction))
    meta = dict(settings, source=source.spec, name=source.name, dtype=dtype.name,
                vocab_size=tok.vocab_size, eot_id=tok.eot_id, num_tokens=n_tokens,
                num_documents=n_docs, split_at=n_tokens - n_val,
                shards=[{"file": s["file"], "tokens": s["tokens"]} for s in shards],
                seconds=round(time.time() - t0, 3))
    atomic_write_json(folder / "meta.json", meta)
    return _Part(source, folder, meta, reused=False)


class TokenDataset:
    """Token caches of one or more weighted sources, sampled as random (x, y) windows."""

    def __init__(self, parts: list[_Part], val_fraction: float):
        self.parts = parts
        self.val_fraction = val_fraction
        self.splits: tuple[str, ...] = ("train", "val") if val_fraction > 0 else ("train",)

    @classmethod
    def prepare(cls, sources: Sequence[str | Source] | str, tokenizer, val_fraction: float = 0.1,
                progress: bool = True, cache_dir: str | Path | None = None,
                workers: int | None = None, chunk_bytes: int = CHUNK_BYTES) -> "TokenDataset":
        """Tokenize every source (or reuse its cache). ``tokenizer``: a Tokenizer or its folder;
        ``workers``: processes that encode chunks side by side (default: one per CPU core);
        ``chunk_bytes``: about how much of a file one shard holds."""
        from gptlab.tokenizer import Tokenizer
        if not isinstance(tokenizer, Tokenizer):
            tokenizer = Tokenizer.load(tokenizer)
        if not 0 <= val_fraction < 1:
            raise GptlabError(f"--val-fraction must be in [0, 1), got {val_fraction}")
        root = Path(cache_dir) if cache_dir else gptlab_home() / "tokens"
        tok_sha = _tokenizer_sha(tokenizer)
        if workers is not None and workers < 1:
            raise GptlabError(f"--workers must be at least 1, got {workers}")
        parts = [_prepare_part(s, tokenizer, tok_sha, val_fraction, root, progress, workers, chunk_bytes)
                 for s in parse_sources(sources)]
        return cls(parts, val_fraction)

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise GptlabError(f"no {split!r} split (splits: {', '.join(self.splits)})")

    def num_tokens(self, split: str | None = None) -> int:
        """Tokens in ``split``, or in the whole corpus when ``split`` is None."""
        if split is None:
            return sum(p.meta["num_tokens"] for p in self.parts)
        self._check_split(split)
        return sum(b - a for p in self.parts for a, b in [p.span(split)])

    def check_fits(self, block_size: int) -> None:
        """Every source must hold at least one window of block_size + 1 tokens in every split."""
        for p in self.parts:
            for split in self.splits:
                a, b = p.span(split)
                if b - a < block_size + 1:
                    raise GptlabError(
                        f"corpus {p.source.spec} has only {b - a} tokens in split {split}, shorter "
                        f"than one context window of block_size+1 = {block_size + 1}")

    def get_batch(self, split: str, batch_size: int, block_size: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows as int64 [B, T] inputs and targets (targets = inputs shifted by one).

        Each row picks a source with probability proportional to its weight, then a uniform start.
        Only ``generator`` supplies randomness, so a batch is a function of its state.
        """
        import torch
        self._check_split(split)
        self.check_fits(block_size)
        weights = torch.tensor([p.source.weight for p in self.parts], dtype=torch.float64)
        which = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
        u = torch.rand(batch_size, dtype=torch.float64, generator=generator)
        out = np.empty((batch_size, block_size + 1), dtype=np.int64)
        for row, (i, r) in enumerate(zip(which.tolist(), u.tolist())):
            part = self.parts[i]
            a, b = part.span(split)
            starts = b - a - block_size  # number of valid window starts
            s = a + min(int(r * starts), starts - 1)
            out[row] = part.tokens[s:s + block_size + 1]
        t = torch.from_numpy(out)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def describe(self) -> list[dict]:
        """One row per source for printing: name, weight, documents, train/val tokens, cache."""
        rows = []
        for p in self.parts:
            a, b = p.span("train")
            c, d = p.span("val")
            rows.append({"source": p.source.spec, "weight": p.source.weight,
                         "documents": p.meta["num_documents"], "train": b - a, "val": d - c,
                         "dtype": p.meta["dtype"], "cached": p.reused, "folder": str(p.folder)})
        return rows
