"""Corpora: where training text comes from, and how several are mixed.

A source is given on the command line as ``--data PATH[:WEIGHT]`` and can be

* a text file (any extension except .jsonl): one document;
* a folder: every ``*.txt`` and ``*.md`` below it, sorted by relative path so the order (and so the
  token cache and every batch) is the same on every machine; one document per file; files and
  folders whose names start with "." are skipped (editor backups, .git);
* a ``.jsonl`` file: one document per record, taken from its ``text`` field;
* ``shakespeare`` or ``mixture``: the built-in corpora (downloaded/generated on first use). Write
  ``./shakespeare`` for a local folder of that name.

WEIGHT (default 1) sets how often training batches draw from the source, relative to the others.
Every problem with a source is a one-line GptlabError naming the file (and line or byte offset).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from gptlab.errors import GptlabError
from gptlab.io import iter_jsonl

BUILTIN = ("shakespeare", "mixture")
TEXT_SUFFIXES = (".txt", ".md")


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
            (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
             and not any(part.startswith(".") for part in p.relative_to(root).parts)),
            key=lambda p: p.relative_to(root).as_posix())
        if not found:
            raise GptlabError(f"--data {self.spec}: empty corpus (no .txt or .md files under {root})")
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

    def fingerprint(self) -> str:
        """sha256 over every file's relative name and contents: changes whenever the text does."""
        root = self.resolve()
        h = hashlib.sha256()
        for f in self.files():
            rel = f.name if root.is_file() else f.relative_to(root).as_posix()
            h.update(rel.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
        return h.hexdigest()

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files())


def _decode(path: Path, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GptlabError(f"{path}: not UTF-8 (invalid byte at offset {e.start})") from None
    return text[1:] if text.startswith("\ufeff") else text  # a BOM is not text


def _read_documents(path: Path) -> Iterator[str]:
    if path.suffix.lower() == ".jsonl":
        _decode(path, path.read_bytes())  # report bad bytes with the offset, like plain files
        for line, rec in iter_jsonl(path):
            if "text" not in rec:
                raise GptlabError(f"{path}:{line}: record has no \"text\" field")
            if not isinstance(rec["text"], str):
                raise GptlabError(f"{path}:{line}: \"text\" is not a string")
            yield rec["text"]
    else:
        yield _decode(path, path.read_bytes())


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
