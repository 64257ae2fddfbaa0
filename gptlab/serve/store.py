"""The chat server's memory: conversations, messages, thumbs and side-by-side comparisons in SQLite.

Why SQLite: one file, no server, crash-safe transactions, and WAL mode lets the web page read while a
reply is being written. A single connection guarded by a lock keeps it safe from the server's many
threads (SQLite serialises writes anyway, and every query here is tiny).

Messages form a tree: each message points at the one it follows (``parent_id``). A regenerated answer
is a sibling of the old one (same parent, ``regenerated_from`` = the old id), so both stay on record
and a thumbs-down on one with a thumbs-up on the other becomes a preference pair. The conversation as
shown is the path from the root to the newest message.

``export_feedback`` turns what users said into training data for ``gptlab rm`` / ``dpo`` / ``sft``.
"""
from __future__ import annotations

import itertools
import json
import os
import sqlite3
import threading
import time
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.io import atomic_write_jsonl, gptlab_home

# Version 2: AUTOINCREMENT keys, so an id is never handed out twice (a stale browser tab holding the id
# of a deleted message must not rate or regenerate whatever took its place).
SCHEMA_VERSION = 2
APPLICATION_ID = 0x67707463   # "gptc" in PRAGMA application_id: marks the file as gptlab's chat database
TABLES = ("conversations", "messages", "feedback", "comparisons")
ROLES = ("system", "user", "assistant")

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    title         TEXT NOT NULL DEFAULT '',
    system_prompt TEXT NOT NULL DEFAULT '',
    created       REAL NOT NULL,
    updated       REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id  INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    parent_id        INTEGER REFERENCES messages(id) ON DELETE CASCADE,
    regenerated_from INTEGER REFERENCES messages(id) ON DELETE SET NULL,
    role             TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content          TEXT NOT NULL,
    model            TEXT,
    finish_reason    TEXT,
    created          REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
CREATE TABLE IF NOT EXISTS feedback (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id INTEGER NOT NULL UNIQUE REFERENCES messages(id) ON DELETE CASCADE,
    rating     INTEGER NOT NULL CHECK (rating IN (-1, 1)),
    created    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS comparisons (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER REFERENCES conversations(id) ON DELETE CASCADE,
    message_id      INTEGER REFERENCES messages(id) ON DELETE CASCADE,  -- the user turn compared on
    prompt          TEXT NOT NULL,                                     -- messages JSON, ends with user
    answer_a        TEXT NOT NULL,
    answer_b        TEXT NOT NULL,
    choice          TEXT CHECK (choice IN ('a', 'b', 'tie')),          -- NULL until the user picks
    model           TEXT,
    created         REAL NOT NULL,
    decided         REAL
);
"""

# Tools the server ran while writing an answer, shown collapsed above it on the page. A table of its own,
# created where missing: older files gain it on open and nothing else about them changes.
TOOL_SCHEMA = """
CREATE TABLE IF NOT EXISTS tool_runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id  INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    arguments   TEXT NOT NULL,     -- JSON object
    result      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tool_runs_by_message ON tool_runs(message_id, id);
"""

# Pictures a user attached to a message (the bytes as uploaded, already checked to decode), also a table
# of its own created where missing.
IMAGE_SCHEMA = """
CREATE TABLE IF NOT EXISTS message_images (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id  INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    mime        TEXT NOT NULL,
    data        BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS message_images_by_message ON message_images(message_id, id);
"""


def default_db_path() -> Path:
    return gptlab_home() / "chat.sqlite3"


def _row(r: sqlite3.Row | None) -> dict | None:
    return dict(r) if r is not None else None


class Store:
    """Thread-safe access to the chat database (created on first use, schema checked on open)."""

    def __init__(self, path: str | os.PathLike | None = None):
        try:
            self.path = Path(path) if path else default_db_path()
            if str(self.path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise GptlabError(f"{path or 'GPTLAB_HOME'}: cannot create the chat database's folder "
                              f"({e.strerror or e})") from None
        self._lock = threading.RLock()
        try:
            # isolation_level=None: we open transactions ourselves (BEGIN IMMEDIATE) so each write is
            # one atomic unit and two writers never deadlock upgrading read locks.
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                       timeout=30)
            self._db.row_factory = sqlite3.Row
            version = self._check_ours()   # before changing anything in the file
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")   # WAL + NORMAL: an app crash loses nothing
            if version == 1:
                self._migrate_v1()
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript("BEGIN IMMEDIATE;" + SCHEMA + TOOL_SCHEMA + IMAGE_SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION};"
                                   f"PRAGMA application_id={APPLICATION_ID};COMMIT;")
        except (sqlite3.DatabaseError, GptlabError) as e:
            if getattr(self, "_db", None) is not None:
                self._db.close()   # nothing held open (or left in WAL mode) by a refused file
            if isinstance(e, GptlabError):
                raise
            raise GptlabError(f"{self.path}: not a usable chat database ({e})") from None

    def _check_ours(self) -> int:
        """The schema version of a gptlab chat database (0: an empty file); refuse any other database,
        which opening would otherwise convert (WAL mode, four new tables, a new user_version)."""
        app_id = self._db.execute("PRAGMA application_id").fetchone()[0]
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in self._db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
        legacy = app_id == 0 and version == 1 and tables == set(TABLES)   # written before application_id
        if app_id == APPLICATION_ID or legacy or (app_id == 0 and version == 0 and not tables):
            if version > SCHEMA_VERSION:
                raise GptlabError(f"{self.path}: written by a newer gptlab (schema {version})")
            return version
        held = f"tables {', '.join(sorted(tables))}" if tables else f"application_id {app_id}"
        raise GptlabError(f"{self.path}: not a gptlab chat database ({held}); refusing to change it "
                          "(pass --db with a new file name)")

    def _migrate_v1(self) -> None:
        """Schema 1 -> 2: rebuild each table with AUTOINCREMENT keys, rows and ids kept (SQLite cannot
        add AUTOINCREMENT to a column in place). One transaction: a failure (a full disk, rows whose
        references are broken) leaves the file exactly as it was. Foreign keys are off while the tables
        are swapped (the pragma cannot change inside a transaction) and checked before committing."""
        self._db.execute("PRAGMA foreign_keys=OFF")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for name in TABLES:
                ddl = SCHEMA[SCHEMA.index(f"CREATE TABLE IF NOT EXISTS {name} ("):]
                ddl = ddl[: ddl.index(");") + 2].replace(f"IF NOT EXISTS {name} (", f"{name}_v2 (")
                for sql in (ddl, f"INSERT INTO {name}_v2 SELECT * FROM {name}", f"DROP TABLE {name}",
                            f"ALTER TABLE {name}_v2 RENAME TO {name}"):
                    self._db.execute(sql)
            broken = self._db.execute("PRAGMA foreign_key_check").fetchone()
            if broken is not None:
                raise GptlabError(f"{self.path}: cannot migrate to schema 2: a row of {broken[0]} refers to "
                                  f"a missing row of {broken[2]} (the file is left as it was)")
            self._db.execute("PRAGMA user_version=2")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    # ----- plumbing -----------------------------------------------------------------------------
    def _tx(self):
        return _Transaction(self)

    def _query(self, sql: str, args=()) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args).fetchall()]

    def _one(self, sql: str, args=()) -> dict | None:
        with self._lock:
            return _row(self._db.execute(sql, args).fetchone())

    def journal_mode(self) -> str:
        return self._one("PRAGMA journal_mode")["journal_mode"]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ----- conversations ------------------------------------------------------------------------
    def create_conversation(self, title: str = "", system_prompt: str = "") -> dict:
        now = time.time()
        with self._tx() as db:
            cur = db.execute("INSERT INTO conversations (title, system_prompt, created, updated) "
                             "VALUES (?, ?, ?, ?)", (title, system_prompt, now, now))
            cid = cur.lastrowid
        return self.get_conversation(cid)

    def get_conversation(self, cid: int) -> dict | None:
        return self._one("SELECT * FROM conversations WHERE id = ?", (cid,))

    def list_conversations(self) -> list[dict]:
        return self._query("SELECT * FROM conversations ORDER BY updated DESC, id DESC")

    def update_conversation(self, cid: int, title: str | None = None,
                            system_prompt: str | None = None) -> dict | None:
        with self._tx() as db:
            if title is not None:
                db.execute("UPDATE conversations SET title = ?, updated = ? WHERE id = ?",
                           (title, time.time(), cid))
            if system_prompt is not None:
                db.execute("UPDATE conversations SET system_prompt = ?, updated = ? WHERE id = ?",
                           (system_prompt, time.time(), cid))
        return self.get_conversation(cid)

    def delete_conversation(self, cid: int) -> bool:
        """Delete a conversation and everything recorded about it (messages, thumbs, comparisons)."""
        with self._tx() as db:
            return db.execute("DELETE FROM conversations WHERE id = ?", (cid,)).rowcount > 0

    # ----- messages -----------------------------------------------------------------------------
    def add_message(self, conversation_id: int, role: str, content: str, parent_id: int | None = None,
                    model: str | None = None, finish_reason: str | None = None,
                    regenerated_from: int | None = None) -> dict:
        if role not in ROLES:
            raise GptlabError(f"unknown role {role!r}")
        now = time.time()
        with self._tx() as db:
            conv = db.execute("SELECT title FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
            if conv is None:
                raise GptlabError(f"no conversation {conversation_id}")
            if parent_id is not None:
                parent = db.execute("SELECT conversation_id FROM messages WHERE id = ?", (parent_id,)).fetchone()
                if parent is None or parent[0] != conversation_id:
                    raise GptlabError(f"message {parent_id} is not in conversation {conversation_id}")
            cur = db.execute(
                "INSERT INTO messages (conversation_id, parent_id, regenerated_from, role, content, model, "
                "finish_reason, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (conversation_id, parent_id, regenerated_from, role, content, model, finish_reason, now))
            mid = cur.lastrowid
            # The first user message names an untitled conversation, as in ChatGPT's sidebar.
            title = conv[0] if conv[0] or role != "user" else _title(content)
            db.execute("UPDATE conversations SET updated = ?, title = ? WHERE id = ?",
                       (now, title, conversation_id))
        return self.get_message(mid)

    def add_tool_runs(self, message_id: int, runs: list[dict]) -> None:
        """Record the tools run for an answer ({name, arguments, result} each, in order)."""
        with self._tx() as db:
            db.executemany("INSERT INTO tool_runs (message_id, name, arguments, result) VALUES (?, ?, ?, ?)",
                           [(message_id, r["name"], json.dumps(r["arguments"], ensure_ascii=False), r["result"])
                            for r in runs])

    def tool_runs(self, message_ids: list[int]) -> dict[int, list[dict]]:
        """{message id: [{name, arguments, result}]} for those of ``message_ids`` that ran tools."""
        out: dict[int, list[dict]] = {}
        for i in range(0, len(message_ids), 500):
            chunk = message_ids[i:i + 500]
            for r in self._query(f"SELECT * FROM tool_runs WHERE message_id IN ({','.join('?' * len(chunk))}) "
                                 "ORDER BY id", chunk):
                out.setdefault(r["message_id"], []).append(
                    {"name": r["name"], "arguments": json.loads(r["arguments"]), "result": r["result"]})
        return out

    def add_images(self, message_id: int, images: list[tuple[str, bytes]]) -> None:
        """Attach pictures ((mime type, bytes) each, in order) to a message."""
        with self._tx() as db:
            db.executemany("INSERT INTO message_images (message_id, mime, data) VALUES (?, ?, ?)",
                           [(message_id, mime, sqlite3.Binary(data)) for mime, data in images])

    def images(self, message_ids: list[int]) -> dict[int, list[tuple[str, bytes]]]:
        """{message id: [(mime, bytes)]} for those of ``message_ids`` that hold pictures."""
        out: dict[int, list[tuple[str, bytes]]] = {}
        for i in range(0, len(message_ids), 500):
            chunk = message_ids[i:i + 500]
            for r in self._query(f"SELECT * FROM message_images WHERE message_id IN ({','.join('?' * len(chunk))}) "
                                 "ORDER BY id", chunk):
                out.setdefault(r["message_id"], []).append((r["mime"], bytes(r["data"])))
        return out

    def get_message(self, mid: int) -> dict | None:
        return self._one("SELECT m.*, f.rating FROM messages m LEFT JOIN feedback f ON f.message_id = m.id "
                         "WHERE m.id = ?", (mid,))

    def messages(self, conversation_id: int) -> list[dict]:
        """Every message of a conversation, branches included, oldest first."""
        return self._query("SELECT m.*, f.rating FROM messages m LEFT JOIN feedback f ON f.message_id = m.id "
                           "WHERE m.conversation_id = ? ORDER BY m.id", (conversation_id,))

    def path_to(self, mid: int | None) -> list[dict]:
        """Messages from the root down to ``mid`` (inclusive)."""
        if mid is None:
            return []
        return self._query(
            "WITH RECURSIVE up(id, depth) AS (SELECT ?, 0 UNION ALL "
            "SELECT m.parent_id, up.depth + 1 FROM messages m JOIN up ON m.id = up.id "
            "WHERE m.parent_id IS NOT NULL) "
            "SELECT m.*, f.rating FROM up JOIN messages m ON m.id = up.id "
            "LEFT JOIN feedback f ON f.message_id = m.id ORDER BY up.depth DESC", (mid,))

    def thread(self, conversation_id: int) -> list[dict]:
        """The conversation as shown: the path to its newest message."""
        last = self._one("SELECT max(id) AS id FROM messages WHERE conversation_id = ?", (conversation_id,))
        return self.path_to(last["id"] if last else None)

    def chat_messages(self, conversation_id: int, upto: int | None, with_images: bool = False) -> list[dict]:
        """{role, content} list for the model: the system prompt, then the path to ``upto``. With
        ``with_images`` a message with pictures has content parts: its pictures ({"type": "image",
        "data": bytes}), then its text."""
        conv = self.get_conversation(conversation_id)
        out = [{"role": "system", "content": conv["system_prompt"]}] if conv and conv["system_prompt"] else []
        path = self.path_to(upto)
        pics = self.images([m["id"] for m in path if m["role"] == "user"]) if with_images else {}
        for m in path:
            content = m["content"]
            if m["id"] in pics:
                content = [{"type": "image", "data": data} for _, data in pics[m["id"]]] + \
                          [{"type": "text", "text": content}]
            out.append({"role": m["role"], "content": content})
        return out

    # ----- feedback -----------------------------------------------------------------------------
    def set_feedback(self, message_id: int, rating: int) -> dict | None:
        """Thumbs up (+1) or down (-1) on an assistant answer; 0 clears it. One rating per message."""
        if rating not in (-1, 0, 1):
            raise GptlabError("rating must be 1, -1 or 0")
        with self._tx() as db:
            msg = db.execute("SELECT role FROM messages WHERE id = ?", (message_id,)).fetchone()
            if msg is None:
                raise GptlabError(f"no message {message_id}")
            if msg[0] != "assistant":
                raise GptlabError("only assistant answers can be rated")
            db.execute("DELETE FROM feedback WHERE message_id = ?", (message_id,))
            if rating:
                db.execute("INSERT INTO feedback (message_id, rating, created) VALUES (?, ?, ?)",
                           (message_id, rating, time.time()))
        return self._one("SELECT * FROM feedback WHERE message_id = ?", (message_id,))

    def feedback(self) -> list[dict]:
        return self._query("SELECT * FROM feedback ORDER BY id")

    # ----- comparisons --------------------------------------------------------------------------
    def add_comparison(self, conversation_id: int | None, prompt: list[dict], answer_a: str, answer_b: str,
                       message_id: int | None = None, model: str | None = None,
                       choice: str | None = None) -> dict:
        if choice not in (None, "a", "b", "tie"):
            raise GptlabError("choice must be 'a', 'b' or 'tie'")
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO comparisons (conversation_id, message_id, prompt, answer_a, answer_b, choice, "
                "model, created, decided) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (conversation_id, message_id, json.dumps(prompt, ensure_ascii=False), answer_a, answer_b,
                 choice, model, now, now if choice else None))
            kid = cur.lastrowid
        return self.get_comparison(kid)

    def set_comparison_choice(self, comparison_id: int, choice: str) -> dict:
        if choice not in ("a", "b", "tie"):
            raise GptlabError("choice must be 'a', 'b' or 'tie'")
        with self._tx() as db:
            n = db.execute("UPDATE comparisons SET choice = ?, decided = ? WHERE id = ?",
                           (choice, time.time(), comparison_id)).rowcount
            if not n:
                raise GptlabError(f"no comparison {comparison_id}")
        return self.get_comparison(comparison_id)

    def get_comparison(self, kid: int) -> dict | None:
        return _comparison(self._one("SELECT * FROM comparisons WHERE id = ?", (kid,)))

    def comparisons(self, conversation_id: int | None = None) -> list[dict]:
        if conversation_id is None:
            rows = self._query("SELECT * FROM comparisons ORDER BY id")
        else:
            rows = self._query("SELECT * FROM comparisons WHERE conversation_id = ? ORDER BY id",
                               (conversation_id,))
        return [_comparison(r) for r in rows]


class _Transaction:
    """``with store._tx() as db:`` = lock + BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any error)."""

    def __init__(self, store: Store):
        self.store = store

    def __enter__(self) -> sqlite3.Connection:
        self.store._lock.acquire()
        try:
            self.store._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.store._lock.release()
            raise
        return self.store._db

    def __exit__(self, exc_type, exc, tb):
        try:
            self.store._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.store._lock.release()
        return False


def _comparison(r: dict | None) -> dict | None:
    if r is not None:
        r["prompt"] = json.loads(r["prompt"])
    return r


def _title(text: str, width: int = 48) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


# ----- export --------------------------------------------------------------------------------------
def feedback_datasets(store: Store) -> tuple[list[dict], list[dict]]:
    """(pairs, conversations) from what users said.

    pairs: each decided comparison (not ties), plus every liked x disliked answer to the same prompt
    (regenerations are siblings, so they share the prompt exactly). conversations: each liked answer
    with the conversation that led to it, for SFT.
    """
    pairs: list[dict] = []
    for c in store.comparisons():
        if c["choice"] in ("a", "b") and c["answer_a"] != c["answer_b"] and c["prompt"]:
            chosen, rejected = (c["answer_a"], c["answer_b"]) if c["choice"] == "a" else (c["answer_b"], c["answer_a"])
            pairs.append({"prompt": c["prompt"], "chosen": chosen, "rejected": rejected,
                          "source": "comparison", "comparison_id": c["id"]})
    groups: dict[str, dict[int, list[dict]]] = {}
    prompts: dict[str, list[dict]] = {}
    sft: list[dict] = []
    for f in store.feedback():
        msg = store.get_message(f["message_id"])
        prompt = store.chat_messages(msg["conversation_id"], msg["parent_id"])
        if not prompt or prompt[-1]["role"] != "user":
            continue   # an answer must follow a user turn to be training data
        key = json.dumps(prompt, ensure_ascii=False, sort_keys=True)
        prompts[key] = prompt
        groups.setdefault(key, {1: [], -1: []})[f["rating"]].append(msg)
        if f["rating"] == 1:
            sft.append({"messages": prompt + [{"role": "assistant", "content": msg["content"]}],
                        "source": "thumbs_up", "message_id": msg["id"]})
    for key, g in groups.items():
        for good, bad in itertools.product(g[1], g[-1]):
            if good["content"] != bad["content"]:
                pairs.append({"prompt": prompts[key], "chosen": good["content"], "rejected": bad["content"],
                              "source": "thumbs", "chosen_id": good["id"], "rejected_id": bad["id"]})
    return pairs, sft


def export_feedback(store: Store, out) -> dict:
    """Write PREFIX.pairs.jsonl and PREFIX.sft.jsonl (or the two given paths) atomically; return counts.
    A folder as PREFIX means FOLDER/feedback."""
    if isinstance(out, (tuple, list)):
        pairs_path, sft_path = (Path(p) for p in out)
    else:
        prefix = str(out)
        if prefix.endswith(("/", os.sep)) or Path(prefix).is_dir():   # a folder: not a hidden ".pairs.jsonl"
            prefix = str(Path(prefix) / "feedback")
        pairs_path, sft_path = Path(prefix + ".pairs.jsonl"), Path(prefix + ".sft.jsonl")
    pairs, sft = feedback_datasets(store)
    atomic_write_jsonl(pairs_path, pairs)
    atomic_write_jsonl(sft_path, sft)
    return {"pairs": len(pairs), "sft": len(sft), "pairs_path": str(pairs_path), "sft_path": str(sft_path)}
