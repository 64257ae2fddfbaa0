"""The search tool: a local document store in one SQLite file, full-text indexed with FTS5 (BM25).

    gptlab index DOCS_DIR --out docs.index

Every .txt, .md and .jsonl file under DOCS_DIR is cut into passages (paragraphs joined up to about
``--chunk-words`` words; a .jsonl line is one document, its ``text`` or ``content`` field). Re-indexing
is incremental: a file whose content hash is unchanged is skipped, a changed one has its passages
replaced, a deleted one removed. It is also atomic: the update is made on a copy next to the index and
moved over it in one rename, so a reader (a running server) sees the old index or the new one, never a
half-written one, and a crash leaves the old one intact.

A query is reduced to its words, each quoted (so no FTS5 syntax from a user or a model gets through),
joined with OR, and ranked by BM25.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import time
from pathlib import Path

from gptlab.errors import GptlabError

SUFFIXES = (".txt", ".md", ".jsonl")
SEARCH_SPEC = {"name": "search", "description": "find passages in the local documents",
               "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}
SCHEMA_VERSION = 1
_WORD = re.compile(r"\w+", re.UNICODE)


# ----- cutting documents into passages ------------------------------------------------------------------
def _split_long(paragraph: str, max_words: int) -> list[str]:
    words = paragraph.split()
    if len(words) <= max_words:
        return [" ".join(words)]
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(words))
    out, cur = [], []
    for s in sentences:
        sw = s.split()
        while len(sw) > max_words:   # one sentence longer than a passage: cut it by words
            out.append(" ".join(sw[:max_words]))
            sw = sw[max_words:]
        if cur and len(cur) + len(sw) > max_words:
            out.append(" ".join(cur))
            cur = []
        cur += sw
    if cur:
        out.append(" ".join(cur))
    return out


def chunk_text(text: str, max_words: int = 80) -> list[str]:
    """Passages of at most ``max_words`` words: whole paragraphs joined while they fit, long ones cut
    at sentence ends. A Markdown heading starts a new passage (it says what follows is about)."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n|\n(?=#)", text) if p.strip()]
    out, cur = [], []
    for p in paragraphs:
        for piece in _split_long(p, max_words):
            n = len(piece.split())
            if cur and (len(" ".join(cur).split()) + n > max_words or piece.startswith("#")):
                out.append(" ".join(cur))
                cur = []
            cur.append(piece)
    if cur:
        out.append(" ".join(cur))
    return out


def _passages(path: Path, rel: str, max_words: int) -> list[str]:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise GptlabError(f"{path}: not UTF-8 text") from None
    if path.suffix != ".jsonl":
        return chunk_text(raw, max_words)
    out = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise GptlabError(f"{path}:{n}: not JSON ({e.msg})") from None
        text = row.get("text", row.get("content")) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise GptlabError(f"{path}:{n}: needs a string \"text\" (or \"content\") field")
        title = row.get("title")
        if isinstance(title, str) and title.strip():
            text = f"{title.strip()}. {text}"
        out += chunk_text(text, max_words)
    return out


# ----- the index --------------------------------------------------------------------------------------
def _create(db: sqlite3.Connection) -> None:
    db.executescript("""
        CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
        CREATE TABLE IF NOT EXISTS files(path TEXT PRIMARY KEY, sha256 TEXT NOT NULL, passages INTEGER);
        CREATE VIRTUAL TABLE IF NOT EXISTS passages USING fts5(text, path UNINDEXED, tokenize='porter unicode61');
    """)
    db.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?)", (str(SCHEMA_VERSION),))


def _check_index(db: sqlite3.Connection, path) -> None:
    try:
        row = db.execute("SELECT value FROM meta WHERE key='version'").fetchone()
    except sqlite3.DatabaseError:
        raise GptlabError(f"{path}: not a gptlab search index (build one with `gptlab index DOCS --out INDEX`)") from None
    if row is None or row[0] != str(SCHEMA_VERSION):
        raise GptlabError(f"{path}: index version {row and row[0]} is not {SCHEMA_VERSION}; rebuild it")


def build_index(docs: str | Path, out: str | Path, max_words: int = 80) -> dict:
    """Create or update the index ``out`` from the folder ``docs``; {"added", "updated", "removed",
    "unchanged", "passages"}."""
    docs, out = Path(docs), Path(out)
    if not docs.is_dir():
        raise GptlabError(f"{docs}: not a folder")
    if out.exists() and not out.is_file():
        raise GptlabError(f"--out {out}: exists and is not a file")
    if max_words < 5:
        raise GptlabError("--chunk-words must be at least 5")
    files = {p.relative_to(docs).as_posix(): p for p in sorted(docs.rglob("*"))
             if p.is_file() and p.suffix in SUFFIXES and not any(s.startswith(".") for s in p.relative_to(docs).parts)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if out.exists():
            shutil.copyfile(out, tmp)
        db = sqlite3.connect(tmp)
        try:
            if out.exists():
                _check_index(db, out)
            _create(db)
            known = dict(db.execute("SELECT path, sha256 FROM files"))
            stats = {"added": 0, "updated": 0, "removed": 0, "unchanged": 0}
            for rel in sorted(set(known) - set(files)):
                db.execute("DELETE FROM passages WHERE path = ?", (rel,))
                db.execute("DELETE FROM files WHERE path = ?", (rel,))
                stats["removed"] += 1
            for rel, path in files.items():
                digest = hashlib.sha256(path.read_bytes() + f"|{max_words}".encode()).hexdigest()
                if known.get(rel) == digest:
                    stats["unchanged"] += 1
                    continue
                chunks = _passages(path, rel, max_words)
                db.execute("DELETE FROM passages WHERE path = ?", (rel,))
                db.executemany("INSERT INTO passages(text, path) VALUES (?, ?)", [(c, rel) for c in chunks])
                db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?)", (rel, digest, len(chunks)))
                stats["updated" if rel in known else "added"] += 1
            db.commit()
            stats["passages"] = db.execute("SELECT count(*) FROM passages").fetchone()[0]
        finally:
            db.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return stats


def _match(query: str) -> str | None:
    words = list(dict.fromkeys(w.lower() for w in _WORD.findall(query)))[:32]
    return " OR ".join(f'"{w}"' for w in words) or None


def search(index: str | Path, query: str, k: int = 2, deadline: float | None = None) -> list[tuple[str, str]]:
    """The ``k`` best (path, passage) pairs for ``query`` by BM25, best first."""
    index = Path(index)
    if not index.is_file():
        raise GptlabError(f"{index}: no such search index (build one with `gptlab index DOCS --out INDEX`)")
    match = _match(query)
    if match is None:
        return []
    db = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
    try:
        _check_index(db, index)
        if deadline is not None:   # SQLite checks the handler every 1000 steps and stops when it says so
            db.set_progress_handler(lambda: time.monotonic() > deadline, 1000)
        return [(p, t) for p, t in db.execute(
            "SELECT path, text FROM passages WHERE passages MATCH ? ORDER BY bm25(passages) LIMIT ?", (match, k))]
    except sqlite3.OperationalError as e:
        raise GptlabError(f"search failed ({e})") from None
    finally:
        db.close()


def format_results(hits: list[tuple[str, str]]) -> str:
    """What the model reads: one passage per line, its file first."""
    if not hits:
        return "no results"
    return "\n".join(f"[{path}] {text}" for path, text in hits)


def search_tool(index: str | Path, k: int = 2):
    from gptlab.tools import Tool
    index = Path(index)
    db = sqlite3.connect(f"file:{index}?mode=ro", uri=True) if index.is_file() else None
    if db is None:
        raise GptlabError(f"--index {index}: no such file (build one with `gptlab index DOCS --out {index}`)")
    try:
        _check_index(db, index)
    finally:
        db.close()

    def run(arguments: dict, deadline: float) -> str:
        return format_results(search(index, arguments.get("query", ""), k, deadline))
    return Tool(SEARCH_SPEC["name"], SEARCH_SPEC["description"], SEARCH_SPEC["parameters"], run)


# ----- the command ------------------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser("index", help="build or update a search index over a folder of documents",
                       description="Cut the .txt, .md and .jsonl files under DOCS_DIR into passages and index "
                       "them in one SQLite file (FTS5, BM25) for the `search` tool. Running it again updates "
                       "only what changed, and replaces the index atomically.")
    p.add_argument("docs", metavar="DOCS_DIR")
    p.add_argument("--out", required=True, help="the index file")
    p.add_argument("--chunk-words", type=int, default=80, help="words per passage at most")
    p.add_argument("--query", default=None, help="after indexing, print the best passages for this query")
    p.set_defaults(func=run)


def run(args) -> int:
    stats = build_index(args.docs, args.out, args.chunk_words)
    print(f"{args.out}: {stats['passages']} passages ({stats['added']} files added, {stats['updated']} updated, "
          f"{stats['removed']} removed, {stats['unchanged']} unchanged)")
    if args.query:
        print(format_results(search(args.out, args.query, 3)))
    return 0
