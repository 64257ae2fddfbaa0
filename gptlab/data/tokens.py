"""Corpus -> token ids on disk, and random training windows out of them.

Each source is tokenized once into ``gptlab_home()/tokens/<key>/``:

* ``tokens.bin``: every document's ids followed by the end-of-text id, as raw uint16 (vocab <= 65535)
  or uint32, read back through ``np.memmap`` so corpora larger than memory work;
* ``meta.json``: counts, dtype and the split point, written last (its presence marks a whole cache).

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
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from gptlab.data.corpus import Source, parse_sources
from gptlab.errors import GptlabError
from gptlab.io import atomic_open, atomic_write_json, gptlab_home

CACHE_VERSION = 2  # 2: pieces cut only at lone newlines (exactly the ids of whole-text encoding)
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


def _encode_to_file(source: Source, tok, dtype: np.dtype, f, progress: bool) -> tuple[int, int]:
    """Write the source's ids to open file ``f``; returns (num_tokens, num_documents)."""
    total = source.size_bytes()
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenizing {source.name}",
               disable=not progress or total < _PROGRESS_MIN_BYTES)
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
        bar.update(sum(len(p.encode("utf-8")) for p in pieces))
        pieces.clear(), ends.clear()
        return len(arr)

    for doc in source.documents():
        n_docs += 1
        doc_pieces = list(_pieces(doc))
        for i, p in enumerate(doc_pieces):
            pieces.append(p)
            ends.append(i == len(doc_pieces) - 1)
            size += len(p)
            if size >= _BATCH_CHARS:
                n_tokens += flush()
                size = 0
    if pieces:
        n_tokens += flush()
    bar.close()
    return n_tokens, n_docs


@dataclass
class _Part:
    """One source's cache: tokens [0, split_at) are train, [split_at, num_tokens) are val."""
    source: Source
    folder: Path
    meta: dict
    reused: bool
    _mm: np.memmap | None = field(default=None, repr=False)

    @property
    def tokens(self) -> np.memmap:
        if self._mm is None:
            self._mm = np.memmap(self.folder / "tokens.bin", dtype=self.meta["dtype"], mode="r")
        return self._mm

    def span(self, split: str) -> tuple[int, int]:
        cut = self.meta["split_at"]
        return (0, cut) if split == "train" else (cut, self.meta["num_tokens"])


def _load_valid(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        size = (folder / "tokens.bin").stat().st_size
    except (OSError, ValueError):
        return None
    if meta.get("version") != CACHE_VERSION:
        return None
    if size != meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize:
        return None
    return meta


def _prepare_part(source: Source, tok, tok_sha: str, val_fraction: float, root: Path,
                  progress: bool) -> _Part:
    settings = {"version": CACHE_VERSION, "content_sha256": source.fingerprint(),
                "tokenizer_sha256": tok_sha, "val_fraction": val_fraction, "split": "tail"}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]
    folder = root / key
    meta = _load_valid(folder)
    if meta is not None:
        return _Part(source, folder, meta, reused=True)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tok.vocab_size)
    t0 = time.time()
    with atomic_open(folder / "tokens.bin") as f:
        n_tokens, n_docs = _encode_to_file(source, tok, dtype, f, progress)
    n_val = int(round(n_tokens * val_fraction))
    meta = dict(settings, source=source.spec, name=source.name, dtype=dtype.name,
                vocab_size=tok.vocab_size, eot_id=tok.eot_id, num_tokens=n_tokens,
                num_documents=n_docs, split_at=n_tokens - n_val,
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
                progress: bool = True, cache_dir: str | Path | None = None) -> "TokenDataset":
        """Tokenize every source (or reuse its cache). ``tokenizer``: a Tokenizer or its folder."""
        from gptlab.tokenizer import Tokenizer
        if not isinstance(tokenizer, Tokenizer):
            tokenizer = Tokenizer.load(tokenizer)
        if not 0 <= val_fraction < 1:
            raise GptlabError(f"--val-fraction must be in [0, 1), got {val_fraction}")
        root = Path(cache_dir) if cache_dir else gptlab_home() / "tokens"
        tok_sha = _tokenizer_sha(tokenizer)
        parts = [_prepare_part(s, tokenizer, tok_sha, val_fraction, root, progress)
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
