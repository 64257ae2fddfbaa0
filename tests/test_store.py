"""The chat database: CRUD, WAL, threads, restarts and the feedback export formats."""
import json
import sqlite3
import threading

import pytest

from gptlab.data.formats import parse_conversation, parse_pair
from gptlab.errors import GptlabError
from gptlab.serve.store import Store, export_feedback, feedback_datasets


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "chat.sqlite3")
    yield s
    s.close()


def _chat(store, system=""):
    c = store.create_conversation(system_prompt=system)
    u = store.add_message(c["id"], "user", "What is 2+2?")
    a = store.add_message(c["id"], "assistant", "4", parent_id=u["id"], model="m")
    return c, u, a


def test_conversation_crud(store):
    c = store.create_conversation()
    assert c["title"] == "" and store.get_conversation(c["id"])
    store.add_message(c["id"], "user", "  Tell me   about   the sea, in great and wonderful detail please  ")
    conv = store.get_conversation(c["id"])
    assert conv["title"].startswith("Tell me about the sea") and len(conv["title"]) <= 48  # named by 1st turn
    store.update_conversation(c["id"], title="Sea", system_prompt="Be brief.")
    assert store.get_conversation(c["id"])["title"] == "Sea"
    other = store.create_conversation(title="x")
    assert [x["id"] for x in store.list_conversations()] == [other["id"], c["id"]]   # newest first
    assert store.delete_conversation(c["id"]) and not store.delete_conversation(c["id"])
    assert store.get_conversation(c["id"]) is None and store.messages(c["id"]) == []


def test_messages_tree_thread_and_prompt(store):
    c, u, a = _chat(store, system="Be brief.")
    b = store.add_message(c["id"], "assistant", "four", parent_id=u["id"], regenerated_from=a["id"])
    # The thread follows the newest branch; both answers stay on record.
    assert [m["id"] for m in store.thread(c["id"])] == [u["id"], b["id"]]
    assert len(store.messages(c["id"])) == 3
    assert store.get_message(b["id"])["regenerated_from"] == a["id"]
    assert store.chat_messages(c["id"], u["id"]) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    u2 = store.add_message(c["id"], "user", "and 3+3?", parent_id=b["id"])
    assert [m["role"] for m in store.path_to(u2["id"])] == ["user", "assistant", "user"]


def test_bad_input_is_refused(store):
    c, u, a = _chat(store)
    with pytest.raises(GptlabError):
        store.add_message(c["id"], "tool", "x")
    with pytest.raises(GptlabError):
        store.add_message(9999, "user", "x")
    other = store.create_conversation()
    with pytest.raises(GptlabError):   # a parent from another conversation
        store.add_message(other["id"], "assistant", "x", parent_id=u["id"])
    with pytest.raises(GptlabError):
        store.set_feedback(u["id"], 1)   # only answers are rated
    with pytest.raises(GptlabError):
        store.set_feedback(a["id"], 5)
    with pytest.raises(GptlabError):
        store.set_comparison_choice(12345, "a")
    # A failed write leaves nothing half-done behind.
    assert len(store.messages(c["id"])) == 2 and store.messages(other["id"]) == []


def test_feedback_one_rating_per_message(store):
    c, u, a = _chat(store)
    store.set_feedback(a["id"], 1)
    store.set_feedback(a["id"], -1)
    assert [f["rating"] for f in store.feedback()] == [-1]
    assert store.get_message(a["id"])["rating"] == -1
    store.set_feedback(a["id"], 0)
    assert store.feedback() == []


def test_wal_foreign_keys_and_reopen(tmp_path):
    path = tmp_path / "chat.sqlite3"
    s = Store(path)
    assert s.journal_mode() == "wal"
    c, u, a = _chat(s)
    s.set_feedback(a["id"], 1)
    k = s.add_comparison(c["id"], [{"role": "user", "content": "hi"}], "A", "B", message_id=u["id"])
    s.close()
    s2 = Store(path)   # a restart sees everything
    assert [m["content"] for m in s2.thread(c["id"])] == ["What is 2+2?", "4"]
    assert s2.get_comparison(k["id"])["prompt"] == [{"role": "user", "content": "hi"}]
    s2.delete_conversation(c["id"])   # cascades: messages, feedback, comparisons
    assert s2.feedback() == [] and s2.comparisons() == []
    s2.close()
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("SELECT count(*) FROM messages").fetchone()[0] == 0


def test_not_a_database(tmp_path):
    bad = tmp_path / "x.sqlite3"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(GptlabError):
        Store(bad)


def test_many_threads_write_at_once(store):
    c = store.create_conversation()
    errors = []

    def worker(k):
        try:
            for i in range(25):
                m = store.add_message(c["id"], "user", f"{k}-{i}")
                store.messages(c["id"])
                a = store.add_message(c["id"], "assistant", "ok", parent_id=m["id"])
                store.set_feedback(a["id"], 1 if i % 2 else -1)
        except Exception as e:   # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(store.messages(c["id"])) == 8 * 25 * 2 and len(store.feedback()) == 8 * 25


def test_export_formats(store, tmp_path):
    c, u, a = _chat(store, system="Be brief.")
    b = store.add_message(c["id"], "assistant", "It is 5.", parent_id=u["id"], regenerated_from=a["id"])
    store.set_feedback(a["id"], 1)
    store.set_feedback(b["id"], -1)
    p = [{"role": "user", "content": "Name a colour."}]
    store.add_comparison(c["id"], p, "Blue.", "Seven.", choice="a")
    store.add_comparison(c["id"], p, "Red.", "Chair.", choice="b")   # chosen is B's answer
    store.add_comparison(c["id"], p, "Red.", "Green.", choice="tie")  # ties say nothing
    store.add_comparison(c["id"], p, "Red.", "Pink.")                 # undecided

    counts = export_feedback(store, tmp_path / "fb")
    assert counts["pairs"] == 3 and counts["sft"] == 1
    pairs = [json.loads(x) for x in (tmp_path / "fb.pairs.jsonl").read_text().splitlines()]
    sft = [json.loads(x) for x in (tmp_path / "fb.sft.jsonl").read_text().splitlines()]
    assert {(r["chosen"], r["rejected"]) for r in pairs} == {("Blue.", "Seven."), ("Chair.", "Red."), ("4", "It is 5.")}
    thumbs = next(r for r in pairs if r["source"] == "thumbs")
    assert thumbs["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    assert sft[0]["messages"][-1] == {"role": "assistant", "content": "4"}
    assert [m["role"] for m in sft[0]["messages"]] == ["system", "user", "assistant"]

    # Explicit file paths work too, and the files parse with the stage loaders' own validators.
    export_feedback(store, (tmp_path / "p.jsonl", tmp_path / "s.jsonl"))
    for i, row in enumerate(pairs):
        parse_pair(row, f"pairs:{i}")
    for i, row in enumerate(sft):
        parse_conversation(row, f"sft:{i}")


def test_export_empty(store, tmp_path):
    assert feedback_datasets(store) == ([], [])
    counts = export_feedback(store, str(tmp_path / "none"))
    assert counts["pairs"] == 0 and (tmp_path / "none.sft.jsonl").read_text() == ""


def test_feedback_export_command(tmp_path, capsys):
    from gptlab.cli import main
    db = tmp_path / "chat.sqlite3"
    with Store(db) as s:
        c, u, a = _chat(s)
        s.set_feedback(a["id"], 1)
    assert main(["feedback", "export", "--out", str(tmp_path / "out" / "fb"), "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "0 preference pairs" in out and "1 liked conversations" in out
    assert (tmp_path / "out" / "fb.sft.jsonl").read_text().count("\n") == 1
    assert main(["feedback", "export", "--out", str(tmp_path / "x"), "--db", str(tmp_path / "missing.db")]) == 2
