"""Corpora: where training text comes from, and how several are mixed.

A source is given on the command line as ``--data PATH[:WEIGHT]`` and can be

* a text file (any extension but those below): one document;
* a ``.jsonl`` file, or one compressed as ``.jsonl.gz`` / ``.jsonl.zst``: one document per record,
  taken from its ``text`` field;
* a ``.parquet`` file (the format FineWeb and most hub datasets ship): one document per row of its
  ``text`` column (needs pyarrow: ``pip install gptlab[data]``; .zst needs zstandard, ditto);
* a folder: every file of the kinds above below it (``*.txt``, ``*.md``, ``*.jsonl``, ``*.jsonl.gz``,
  ``*.jsonl.zst``, ``*.parquet``), sorted by relative path so the order (and so the token cache and
  every batch) is the same on every machine; files and folders whose names start with "." are
  skipped (editor backups, .git);
* ``shakespeare`` or ``mixture``: the built-in corpora (downloaded/generated on first use). Write
  ``./shakespeare`` for a local folder of that name.

WEIGHT (default 1) sets how often training batches draw from the source, relative to the others.
Every problem with a source is a one-line GptlabError naming the file (and line or byte offset).

Nothing reads a whole corpus into memory: JSONL (plain or compressed) and Parquet stream record by
record, and large files are read in *chunks* (``plan_chunks``): byte ranges of a text or JSONL file cut
at safe places, groups of Parquet row groups, or a whole compressed file (a stream cannot be entered
in the middle). The token cache encodes chunks in parallel processes (gptlab.data.tokens).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from gptlab.errors import GptlabError

BUILTIN = ("shakespeare", "mixture")
TEXT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
CHUNK_BYTES = 64 << 20   # a large file is read (and tokenized) in pieces of about this many bytes


def file_format(path: Path) -> str:
    """"text", "jsonl", "jsonl.gz", "jsonl.zst" or "parquet", from the name."""
    name = path.name.lower()
    for suffix in RECORD_SUFFIXES:
        if name.endswith(suffix):
            return suffix[1:]
    if name.endswith((".gz", ".zst", ".zstd", ".bz2", ".xz")):
        raise GptlabError(f"{path}: compressed corpora are read as .jsonl.gz or .jsonl.zst (one JSON object "
                          "with a \"text\" field per line)")
    return "text"


def _wanted(path: Path) -> bool:
    name = path.name.lower()
    return path.suffix.lower() in TEXT_SUFFIXES or name.endswith(RECORD_SUFFIXES)


@dataclass
class Source:
    """One corpus: ``path`` is a filesystem path or a built-in name; ``spec`` is what the user typed."""
    path: str
    weight: float = 1.0
    spec: str = ""

    def __post_init__(self):
        self.spec = self.spec or self.path
        self._resolved: Path | None = None

    @property
    def name(self) -> str:
        return self.path

    def resolve(self) -> Path:
        """The path on disk; built-in corpora are fetched or generated here, on first use."""
        if self._resolved is None:
            if self.path == "shakespeare":
                from gptlab.data.shakespeare import shakespeare_dir
                self._resolved = shakespeare_dir(ensure=True)
            elif self.path == "mixture":
                from gptlab.data.mixture import ensure_mixture
                self._resolved = ensure_mixture()
            else:
                p = Path(self.path).expanduser()
                if not p.exists():
                    raise GptlabError(f"--data {self.spec}: no such file or folder {p}")
                if not (p.is_file() or p.is_dir()):
                    raise GptlabError(f"--data {self.spec}: {p} is not a regular file or folder")
                self._resolved = p
        return self._resolved

    def files(self) -> list[Path]:
        root = self.resolve()
        if root.is_file():
            return [root]
        found = sorted(
            (p for p in root.rglob("*") if p.is_file() and _wanted(p)
             and not any(part.startswith(".") for part in p.relative_to(root).parts)),
            key=lambda p: p.relative_to(root).as_posix())
        if not found:
            raise GptlabError(f"--data {self.spec}: empty corpus (no .txt or .md files, nor .jsonl[.gz|.zst] "
                              f"or .parquet, under {root})")
        return found

    def documents(self) -> Iterator[str]:
        """Non-empty documents, in a fixed order."""
        any_text = False
        for f in self.files():
            for doc in _read_documents(f):
                if doc:
                    any_text = True
                    yield doc
        if not any_text:
            raise GptlabError(f"--data {self.spec}: empty corpus (no text in {self.resolve()})")

    def texts(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
        """The source's text in pieces of bounded size (whole documents, or parts of a large text
        file): what a tokenizer trains on, in constant memory."""
        for chunk in plan_chunks(self.files(), chunk_bytes):
            for text, _ in chunk_documents(chunk):
                if text:
                    yield text

    def fingerprint(self) -> str:
        """sha256 over every file's relative name and contents: changes whenever the text does."""
        root = self.resolve()
        h = hashlib.sha256()
        for f in self.files():
            rel = f.name if root.is_file() else f.relative_to(root).as_posix()
            h.update(rel.encode() + b"\0" + _file_sha256(f))
        return h.hexdigest()

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files())


def _file_sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.digest()


def _read_documents(path: Path) -> Iterator[str]:
    for text, _ in chunk_documents(Chunk(str(path), file_format(path))):
        yield text


# ----- chunks: bounded pieces of a file, read in constant memory ----------------------------------
@dataclass(frozen=True)
class Chunk:
    """Part of one corpus file: bytes [start, end) of a text or JSONL file, row groups [start, end) of
    a Parquet file, or a whole compressed file (end = -1: to the end). ``size`` is the bytes on disk
    it covers (for progress bars)."""
    path: str
    fmt: str
    start: int = 0
    end: int = -1
    size: int = 0


# A lone newline between two printable ASCII characters is always a pre-token boundary (see
# gptlab.data.tokens), so a text file cut just after it encodes to the same ids as the whole file.
_TEXT_CUT = re.compile(rb"(?<=[!-~])\n(?=[!-~])")


def _cut_after(path: Path, target: int, pattern: re.Pattern | None) -> int | None:
    """The first safe cut at or after byte ``target`` (just after a newline that ``pattern`` accepts,
    or any newline when it is None), or None if there is none before the end of the file."""
    with open(path, "rb") as f:
        pos = max(0, target - 1)
        while True:
            f.seek(pos)
            block = f.read(1 << 20)
            m = pattern.search(block) if pattern is not None else None
            i = m.start() if m else (block.find(b"\n") if pattern is None else -1)
            if i >= 0:
                return pos + i + 1
            if len(block) <= 2:
                return None
            pos += len(block) - 2   # two bytes of overlap: a newline's neighbours on both sides


def plan_chunks(files: Iterable[Path], chunk_bytes: int = CHUNK_BYTES) -> list[Chunk]:
    """Cut every file into chunks of about ``chunk_bytes``, in corpus order."""
    out: list[Chunk] = []
    for path in files:
        fmt, size = file_format(path), path.stat().st_size
        if fmt in ("text", "jsonl"):
            start = 0
            while size - start > chunk_bytes:
                cut = _cut_after(path, start + chunk_bytes, _TEXT_CUT if fmt == "text" else None)
                if cut is None or cut >= size:
                    break
                out.append(Chunk(str(path), fmt, start, cut, cut - start))
                start = cut
            out.append(Chunk(str(path), fmt, start, -1, size - start))
        elif fmt == "parquet":
            meta = _parquet_file(path).metadata
            first, acc = 0, 0
            for g in range(meta.num_row_groups):
                acc += meta.row_group(g).total_byte_size
                if acc >= chunk_bytes or g == meta.num_row_groups - 1:
                    out.append(Chunk(str(path), fmt, first, g + 1, acc))
                    first, acc = g + 1, 0
            if meta.num_row_groups == 0:
                out.append(Chunk(str(path), fmt, 0, 0, 0))
        else:
            out.append(Chunk(str(path), fmt, 0, -1, size))
    return out


def chunk_documents(chunk: Chunk) -> Iterator[tuple[str, bool]]:
    """(text, ends_a_document) for each document or document part in ``chunk``, streamed."""
    path = Path(chunk.path)
    if chunk.fmt == "text":
        with open(path, "rb") as f:
            f.seek(chunk.start)
            data = f.read() if chunk.end < 0 else f.read(chunk.end - chunk.start)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GptlabError(f"{path}: not UTF-8 (invalid byte at offset {chunk.start + e.start})") from None
        if chunk.start == 0 and text.startswith("\ufeff"):
            text = text[1:]   # a BOM is not text
        yield text, chunk.end < 0
    elif chunk.fmt == "parquet":
        for text in _parquet_texts(path, chunk.start, chunk.end):
            yield text, True
    else:
        with _open_lines(path, chunk.fmt) as f:
            if chunk.start:
                f.seek(chunk.start)   # plain JSONL only: compressed files are one chunk each
            offset = chunk.start
            for raw in f:
                if chunk.end >= 0 and offset >= chunk.end:
                    break
                text = _record_text(path, raw, offset)
                offset += len(raw)
                if text is not None:
                    yield text, True


def _open_lines(path: Path, fmt: str):
    if fmt == "jsonl":
        return open(path, "rb")
    if fmt == "jsonl.gz":
        import gzip
        return gzip.open(path, "rb")
    try:
        import zstandard
    except ImportError:
        raise GptlabError(f"{path}: reading .zst needs the zstandard package: pip install 'gptlab[data]'") from None
    raw = open(path, "rb")
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))


def _line_number(path: Path, offset: int) -> str:
    """``path:LINE`` for a record at byte ``offset``; counted only when an error is reported. A
    compressed file's lines are counted in its decompressed text."""
    if path.name.lower().endswith(".jsonl"):
        with open(path, "rb") as f:
            n, left = 1, offset
            while left > 0 and (block := f.read(min(left, 1 << 20))):
                n += block.count(b"\n")
                left -= len(block)
        return f"{path}:{n}"
    with _open_lines(path, file_format(path)) as f:
        n = 1
        for raw in f:
            if offset <= 0:
                break
            offset -= len(raw)
            n += 1
        return f"{path}:{n}"


def _record_text(path: Path, raw: bytes, offset: int) -> str | None:
    """The ``text`` of one JSONL line (None for a blank line); a bad line is an error naming it."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GptlabError(f"{path}: not UTF-8 (invalid byte at offset {offset + e.start})") from None
    if offset == 0 and line.startswith("\ufeff"):
        line = line[1:]
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise GptlabError(f"{_line_number(path, offset)}: not valid JSON ({e.msg})") from None
    if not isinstance(rec, dict):
        raise GptlabError(f"{_line_number(path, offset)}: expected a JSON object")
    if "text" not in rec:
        raise GptlabError(f"{_line_number(path, offset)}: record has no \"text\" field")
    if not isinstance(rec["text"], str):
        raise GptlabError(f"{_line_number(path, offset)}: \"text\" is not a string")
    return rec["text"]


def _parquet_file(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise GptlabError(f"{path}: reading Parquet needs pyarrow: pip install 'gptlab[data]'") from None
    try:
        return pq.ParquetFile(path)
    except Exception as e:   # pyarrow's errors for a file that is not Parquet
        raise GptlabError(f"{path}: not a Parquet file ({str(e).splitlines()[0]})") from None


def _parquet_texts(path: Path, first: int, end: int) -> Iterator[str]:
    """The ``text`` column of row groups [first, end) (end -1: all), a batch of rows at a time (nulls
    skipped)."""
    import pyarrow as pa
    pf = _parquet_file(path)
    groups = range(first, pf.metadata.num_row_groups if end < 0 else end)
    if "text" not in pf.schema_arrow.names:
        raise GptlabError(f"{path}: no \"text\" column (columns: {', '.join(pf.schema_arrow.names[:8])})")
    kind = pf.schema_arrow.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise GptlabError(f"{path}: the \"text\" column holds {kind}, not strings")
    if len(groups):
        for batch in pf.iter_batches(batch_size=4096, row_groups=list(groups), columns=["text"]):
            for t in batch.column(0).to_pylist():
                if t is not None:
                    yield t


def parse_source(spec: str) -> Source:
    """``PATH[:WEIGHT]`` -> Source. A suffix that is not a number stays part of the path."""
    if not spec or not spec.strip():
        raise GptlabError("--data: empty source")
    path, weight = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
            path = head
        except ValueError:
            pass
    if not math.isfinite(weight) or weight <= 0:
        raise GptlabError(f"--data {spec}: weight must be a positive number")
    return Source(path=path, weight=weight, spec=spec)


def parse_sources(specs: Iterable[str] | str) -> list[Source]:
    """Parse ``--data`` values (strings or Sources); at least one is required."""
    if isinstance(specs, (str, Source)):
        specs = [specs]
    out = [s if isinstance(s, Source) else parse_source(s) for s in specs]
    if not out:
        raise GptlabError("--data: give at least one corpus (PATH[:WEIGHT], shakespeare or mixture)")
    return out


def iter_documents(sources: Iterable[Source]) -> Iterator[str]:
    """Every document of every source, in order (weights do not repeat text)."""
    for s in sources:
        yield from s.documents()
