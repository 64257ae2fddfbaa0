"""A hostile or careless client against the server (issue 30): each test here failed before its fix.

Stalls (quadratic context fitting on the event loop), writes from foreign pages, DNS rebinding, 5xx on
odd input (ids past 2^63, lone surrogates), foreign databases converted, ids reused, CLI tracebacks.
"""
import json
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest

from gptlab.tokenizer.chat_template import fit_prompt
from gptlab.cli import main
from gptlab.errors import GptlabError
from gptlab.serve.app import HostPolicy, Limits, create_app
from gptlab.serve.store import Store, export_feedback
from tests.test_serve import FakeBackend, LiveServer, page_client, tok  # noqa: F401  (fixture)

FOREIGN = {"Origin": "http://evil.example", "Content-Type": "text/plain"}


@pytest.fixture(scope="module")
def server(tok, tmp_path_factory):  # noqa: F811
    store = Store(tmp_path_factory.mktemp("db") / "chat.sqlite3")
    with LiveServer(create_app(FakeBackend(tok), store=store)) as s:   # default limits: the worst allowed
        s.store = store
        yield s
    store.close()


# ----- 1. no request stalls the others ----------------------------------------------------------------
def test_context_fitting_is_linear(tok):  # noqa: F811
    calls = []
    real = tok.encode
    tok.encode = lambda text: calls.append(len(text)) or real(text)
    try:
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "x" * 20}
                    for i in range(201)]
        fitted = fit_prompt(tok, messages, 100)
    finally:
        del tok.encode
    assert 0 < len(fitted.messages) < 10 and fitted.dropped == 201 - len(fitted.messages)
    # Old code re-encoded every kept message per dropped one: ~20,000 encodes for this conversation.
    assert len(calls) <= len(fitted.messages) + 1
    # Same result as fitting by brute force (the longest suffix that fits).
    from gptlab.tokenizer.chat_template import render_prompt
    k = len(fitted.messages)
    assert fitted.ids == render_prompt(tok, messages[-k:]) and len(render_prompt(tok, messages[-k - 1:])) > 100


def _health_times(url: str, stop: threading.Event, out: list) -> None:
    with httpx.Client(timeout=30) as http:
        while not stop.is_set():
            t = time.perf_counter()
            assert http.get(url + "/health").status_code == 200
            out.append(time.perf_counter() - t)
            time.sleep(0.01)


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


def test_health_answers_while_the_worst_request_is_served(server):
    limits = Limits()
    n = limits.max_messages
    per = (limits.max_body_bytes - 4096) // n - 40
    chat = json.dumps({"model": "fake-model", "max_tokens": 4, "messages": [
        {"role": "user" if i % 2 == 0 else "assistant", "content": "word " * (per // 5)} for i in range(n)]}).encode()
    legacy = json.dumps({"model": "fake-model", "max_tokens": 4, "prompt": "word " * (per * n // 5)}).encode()
    big = "word " * (limits.max_body_bytes // 5 - 1000)
    # Texts the fitting must judge by their length, never tokenise: a system message, tool descriptions,
    # an old call's arguments (each took 5-13 s on the event loop's GIL before).
    system = _json({"model": "fake-model", "max_tokens": 4, "messages": [
        {"role": "system", "content": big}, {"role": "user", "content": "hi"}]})
    tools = _json({"model": "fake-model", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}],
                   "tools": [{"type": "function", "function": {"name": f"f{i}", "description": "word " * 1600}}
                             for i in range(500)]})
    call = {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "f", "arguments": json.dumps({"x": big[:-100]})}}]}
    answered = _json({"model": "fake-model", "max_tokens": 4, "messages": [
        {"role": "user", "content": "hi"}, call, {"role": "tool", "tool_call_id": "c1", "content": "ok"}]})
    # A whole long history with tools: answered from what fits (its usage was re-encoded on the loop).
    history = _json({"model": "fake-model", "max_tokens": 4, "tool_choice": "none",
                     "tools": [{"type": "function", "function": {"name": "f"}}], "messages": [
                         {"role": "user" if i % 2 == 0 else "assistant", "content": "word " * (per // 5)}
                         for i in range(n - 2)] + [{"role": "user", "content": "hi"}]})
    # Two million JSON values: parsing alone held the GIL for ~130 ms.
    values = b'{"model": "fake-model", "prompt": [' + b"0," * (limits.max_body_bytes // 2 - 100) + b"0]}"
    long = "context_length_exceeded"
    cases = [("/v1/chat/completions", chat, long), ("/v1/completions", legacy, long),
             ("/v1/chat/completions", system, long), ("/v1/chat/completions", tools, long),
             ("/v1/chat/completions", answered, None), ("/v1/chat/completions", history, None),
             ("/v1/completions", values, "too_many_values")]
    for _, body, _ in cases:
        assert len(body) <= limits.max_body_bytes
    times, stop = [], threading.Event()
    poller = threading.Thread(target=_health_times, args=(server.url, stop, times))
    poller.start()
    try:
        time.sleep(0.2)
        with httpx.Client(timeout=60) as http:
            for path, body, code in cases * 2:
                t = time.perf_counter()
                r = http.post(server.url + path, content=body, headers={"content-type": "application/json"})
                took = time.perf_counter() - t
                assert r.status_code == (400 if code else 200), (path, body[:80], r.text[:300])
                assert code is None or r.json()["error"]["code"] == code, r.text
                assert took < 5, (path, took)   # before: 40 s for 201 messages of 2 KB
        time.sleep(0.1)
    finally:
        stop.set()
        poller.join()
    times.sort()
    assert len(times) > 5 and times[len(times) // 2] < 0.1 and times[-1] < 0.25, times[-5:]


def test_json_values_are_counted_outside_strings():
    from gptlab.serve.protocol import MAX_JSON_VALUES, APIError, _parse, _values_outside_strings
    assert _values_outside_strings(b'["a,b[{", "x\\\\", "q\\"q,", [1, 2], {"k": 3}]', 10 ** 9) == 8
    # Commas, escaped quotes and backslashes in long strings (across the scan's chunks) are text, not values.
    text = ('a,b\\"c\\\\,' * 100_000 + ",") * 2
    body = {"t": text, "l": list(range(1000)), "u": text}
    raw = json.dumps(body).encode()
    assert 1001 <= _values_outside_strings(raw, 10 ** 9) <= 1010 and _parse(raw) == body
    with pytest.raises(APIError, match="JSON values"):
        _parse(json.dumps({"t": text, "l": [0] * (MAX_JSON_VALUES + 1)}).encode())


# ----- 2. browsers: only the page itself writes, only our Host names are answered --------------------------
def test_foreign_pages_cannot_write(server):
    before = len(server.store.list_conversations())
    with httpx.Client(base_url=server.url, timeout=10) as http:
        # The form-post a foreign page can send without a preflight.
        r = http.post("/api/conversations", content=b'{"title": "pwned"}', headers=FOREIGN)
        assert r.status_code == 403 and r.json()["error"]["code"] == "cross_site_request"
        r = http.post("/api/conversations", content=b"{}", headers={"Sec-Fetch-Site": "cross-site",
                                                                     "Content-Type": "application/json"})
        assert r.status_code == 403
        r = http.post("/api/conversations", content=b"{}", headers={"Content-Type": "text/plain"})
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
        r = http.post("/api/conversations", json={})   # JSON, same origin, but no CSRF token
        assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_token_invalid"
        r = http.post("/api/conversations", json={}, headers={"X-CSRF-Token": "guess"})
        assert r.status_code == 403
        r = http.post("/v1/chat/completions", content=b"{}", headers=FOREIGN)
        assert r.status_code == 403
    assert len(server.store.list_conversations()) == before
    page = page_client(server)
    r = page.post("/api/conversations", json={}, headers={"Origin": server.url, "Sec-Fetch-Site": "same-origin"})
    assert r.status_code == 200 and len(server.store.list_conversations()) == before + 1


def test_only_our_host_names_are_answered(server):
    port = server.url.rsplit(":", 1)[1]
    with httpx.Client(timeout=10) as http:
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
            r = http.get(server.url + "/api/conversations", headers={"Host": host})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", host
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
            assert http.get(server.url + "/health", headers={"Host": host}).status_code == 200, host
    assert HostPolicy("127.0.0.1", ["chat.example.org"]).allows("Chat.Example.org:8000")
    assert not HostPolicy("127.0.0.1").allows("chat.example.org")
    wild = HostPolicy("0.0.0.0")
    assert wild.allows("192.168.1.5:8000") and wild.allows("[fe80::1]:80") and not wild.allows("evil.example")
    assert HostPolicy("127.0.0.1", ["*"]).allows("anything")


def test_conversation_titles_and_system_prompts_are_bounded(server):
    # Every conversation is listed in full by GET /api/conversations: unbounded fields would make that
    # one response (rendered holding the GIL) as large as the history.
    from gptlab.tokenizer.chat_template import max_token_chars
    backend = server.server.config.app.state.backend
    most = backend.context_size * max_token_chars(backend.tok)
    page = page_client(server)
    before = len(server.store.list_conversations())
    r = page.post("/api/conversations", json={"system_prompt": "x" * (most + 1)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "system_prompt", r.text
    r = page.post("/api/conversations", json={"title": "t" * 201})
    assert r.status_code == 400 and r.json()["error"]["param"] == "title"
    assert len(server.store.list_conversations()) == before
    cid = page.post("/api/conversations", json={"title": "t" * 200, "system_prompt": "x" * most}).json()["id"]
    r = page.patch(f"/api/conversations/{cid}", json={"system_prompt": "y" * (most + 1)})
    assert r.status_code == 400
    assert page.get(f"/api/conversations/{cid}").json()["conversation"]["system_prompt"] == "x" * most


# ----- 3. any input: 2xx or an OpenAI-shaped 4xx --------------------------------------------------------
def test_huge_ids_and_lone_surrogates_are_4xx(server):
    page = page_client(server)
    cid = page.post("/api/conversations", json={}).json()["id"]
    for big in (2 ** 63, 2 ** 64 + 5, 10 ** 30, -(2 ** 63) - 1, 0):
        for method, path, body in [
                ("GET", f"/api/conversations/{big}", None), ("PATCH", f"/api/conversations/{big}", {"title": "x"}),
                ("DELETE", f"/api/conversations/{big}", None),
                ("POST", f"/api/conversations/{big}/messages", {"content": "x"}),
                ("POST", f"/api/conversations/{big}/compare", {"content": "x"}),
                ("POST", f"/api/messages/{big}/regenerate", {}), ("POST", f"/api/messages/{big}/feedback",
                                                                  {"rating": 1}),
                ("POST", f"/api/comparisons/{big}/choice", {"choice": "a"})]:
            r = page.request(method, path, json=body)
            assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}, \
                (method, path, r.status_code, r.text)
    lone = b'"a\\ud800b"'
    for path, body in [
            ("/v1/chat/completions", b'{"model": "fake-model", "messages": [{"role": "user", "content": %s}]}' % lone),
            ("/v1/completions", b'{"model": "fake-model", "prompt": %s}' % lone),
            (f"/api/conversations/{cid}/messages", b'{"content": %s}' % lone),
            ("/api/conversations", b'{"title": %s}' % lone), ("/api/conversations", b'{%s: 1}' % lone)]:
        r = page.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value", (path, r.text)
    # A proper pair (an emoji written as two escapes) is fine.
    r = page.post(f"/api/conversations/{cid}", content=b'{"title": "\\ud83d\\ude00"}',
                  headers={"content-type": "application/json"})
    assert r.status_code == 405 or r.status_code < 300
    r = page.patch(f"/api/conversations/{cid}", content=b'{"title": "\\ud83d\\ude00"}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["title"] == "\U0001F600"


def test_streamed_text_with_unicode_line_breaks_stays_one_event_per_line(server):
    # A model may write U+2028, U+2029 or NEL; clients that split SSE with str.splitlines (httpx's
    # iter_lines) broke those events in two (found by the soak: its clients died on the JSON).
    said = "a\u2028b\x85c\u2029d"
    body = {"model": "fake-model", "stream": True, "temperature": 0, "max_tokens": 30,
            "messages": [{"role": "user", "content": said}]}
    with httpx.Client(base_url=server.url, timeout=20) as http, \
            http.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines), lines
    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or "" for line in lines[:-1])
    assert said in text


# ----- 4 and 5. the store: only gptlab's databases; ids never reused ------------------------------------------
def test_store_refuses_a_foreign_database(tmp_path):
    other = tmp_path / "other.sqlite3"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE birds (name TEXT)")
    db.execute("INSERT INTO birds VALUES ('heron')")
    db.commit()
    db.close()
    before = other.read_bytes()
    with pytest.raises(GptlabError, match="not a gptlab chat database"):
        Store(other)
    assert other.read_bytes() == before and not (tmp_path / "other.sqlite3-wal").exists()
    tagged = tmp_path / "tagged.sqlite3"
    sqlite3.connect(tagged).execute("PRAGMA application_id=42").connection.close()
    with pytest.raises(GptlabError):
        Store(tagged)
    (tmp_path / "empty.sqlite3").write_bytes(b"")
    Store(tmp_path / "empty.sqlite3").close()     # an empty file becomes a chat database
    Store(tmp_path / "empty.sqlite3").close()     # and is recognised as ours next time
    assert main(["feedback", "export", "--db", str(other), "--out", str(tmp_path / "fb")]) == 2
    assert other.read_bytes() == before


V1_SCHEMA = """
CREATE TABLE conversations (id INTEGER PRIMARY KEY, title TEXT NOT NULL DEFAULT '',
    system_prompt TEXT NOT NULL DEFAULT '', created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE messages (id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    parent_id INTEGER REFERENCES messages(id) ON DELETE CASCADE,
    regenerated_from INTEGER REFERENCES messages(id) ON DELETE SET NULL,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')), content TEXT NOT NULL, model TEXT,
    finish_reason TEXT, created REAL NOT NULL);
CREATE INDEX messages_by_conversation ON messages(conversation_id, id);
CREATE TABLE feedback (id INTEGER PRIMARY KEY,
    message_id INTEGER NOT NULL UNIQUE REFERENCES messages(id) ON DELETE CASCADE,
    rating INTEGER NOT NULL CHECK (rating IN (-1, 1)), created REAL NOT NULL);
CREATE TABLE comparisons (id INTEGER PRIMARY KEY,
    conversation_id INTEGER REFERENCES conversations(id) ON DELETE CASCADE,
    message_id INTEGER REFERENCES messages(id) ON DELETE CASCADE, prompt TEXT NOT NULL, answer_a TEXT NOT NULL,
    answer_b TEXT NOT NULL, choice TEXT CHECK (choice IN ('a', 'b', 'tie')), model TEXT, created REAL NOT NULL,
    decided REAL);
INSERT INTO conversations VALUES (1, 'old', '', 0, 0), (2, 'gone', '', 0, 0);
INSERT INTO messages VALUES (1, 1, NULL, NULL, 'user', 'hi', NULL, NULL, 0),
    (2, 1, 1, NULL, 'assistant', 'hello', 'm', 'stop', 0), (3, 2, NULL, NULL, 'user', 'later', NULL, NULL, 0);
INSERT INTO feedback VALUES (1, 2, 1, 0);
PRAGMA user_version=1;
"""


def test_ids_are_never_reused_and_old_databases_migrate(tmp_path):
    with Store(tmp_path / "new.sqlite3") as s:
        c = s.create_conversation()
        m = s.add_message(c["id"], "user", "x")
        s.delete_conversation(c["id"])
        c2 = s.create_conversation()
        assert c2["id"] > c["id"] and s.add_message(c2["id"], "user", "y")["id"] > m["id"]
    old = tmp_path / "v1.sqlite3"
    db = sqlite3.connect(old)
    db.executescript(V1_SCHEMA)
    db.close()
    with Store(old) as s:
        assert s.get_message(2)["rating"] == 1 and [m["id"] for m in s.thread(1)] == [1, 2]
        assert s.delete_conversation(2)
        c = s.create_conversation()
        assert c["id"] == 3 and s.add_message(c["id"], "user", "z")["id"] == 4   # 3 was taken, and deleted
        s.delete_conversation(1)   # cascades still work after the rebuild
        assert s.get_message(1) is None and s.feedback() == []
    db = sqlite3.connect(old)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    assert "AUTOINCREMENT" in db.execute("SELECT sql FROM sqlite_master WHERE name = 'messages'").fetchone()[0]
    db.close()


def test_a_failed_migration_leaves_the_file_as_it_was(tmp_path):
    old = tmp_path / "v1.sqlite3"
    db = sqlite3.connect(old)
    db.executescript(V1_SCHEMA + "INSERT INTO messages VALUES (4, 99, NULL, NULL, 'user', 'orphan', NULL, NULL, 0);")
    db.close()
    with pytest.raises(GptlabError, match="schema 2"):
        Store(old)
    db = sqlite3.connect(old)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 4
    assert "AUTOINCREMENT" not in db.execute("SELECT sql FROM sqlite_master WHERE name = 'messages'").fetchone()[0]
    db.close()


# ----- 6 and 7. the CLI: one-line errors before any model loads ---------------------------------------------
@pytest.fixture
def no_model_load(monkeypatch):
    from gptlab.serve.app import Backend

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")
    monkeypatch.setattr(Backend, "from_run", classmethod(refuse))


def test_serve_checks_the_database_before_loading(tmp_path, capsys, monkeypatch, no_model_load):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["serve", str(tmp_path), "--port", "0", "--db", str(blocker / "chat.sqlite3")]) == 2
    assert "error:" in capsys.readouterr().err
    monkeypatch.setenv("GPTLAB_HOME", str(blocker / "home"))
    assert main(["serve", str(tmp_path), "--port", "0"]) == 2
    assert "GPTLAB_HOME" in capsys.readouterr().err
    assert main(["feedback", "export", "--out", str(tmp_path / "fb")]) == 2


def _run_with_config(tmp_path, model) -> str:
    from gptlab.model.gpt import GPTConfig
    from gptlab import runs as ckpt
    from gptlab.tokenizer import Tokenizer
    run = tmp_path / "run"
    ckpt.write_run_config(run, GPTConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=16),
                          Tokenizer.train(["hello there " * 20], vocab_size=300), stage="pretrain")
    cfg = json.loads((run / "config.json").read_text())
    if isinstance(model, dict):
        cfg["model"].update(model)
    else:
        cfg["model"] = model
    (run / "config.json").write_text(json.dumps(cfg))
    return str(run)


@pytest.mark.parametrize("model", [{"n_layer": "2"}, {"n_layer": None}, [1], None, {"vocab_size": 1e10},
                                   {"block_size": 10 ** 9}, {"vocab_size": 10 ** 10}, {"dropout": "0.1"}])
def test_bad_run_config_is_one_line(tmp_path, capsys, model):
    run = _run_with_config(tmp_path, model)
    assert main(["serve", run, "--port", "0", "--db", str(tmp_path / "c.sqlite3")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err


def test_pretrain_out_naming_a_file(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("keep me")
    assert main(["pretrain", "--data", "shakespeare", "--tokenizer", str(tmp_path), "--out", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err and f.read_text() == "keep me"


def test_export_into_a_folder_leaves_no_hidden_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with Store(tmp_path / "c.sqlite3") as s:
        c = s.create_conversation()
        u = s.add_message(c["id"], "user", "q")
        s.set_feedback(s.add_message(c["id"], "assistant", "a", parent_id=u["id"])["id"], 1)
        for prefix in (str(out) + "/", out):
            counts = export_feedback(s, prefix)
            assert counts["sft"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["feedback.pairs.jsonl", "feedback.sft.jsonl"]


def test_paths_that_cannot_be_written_are_one_line(tmp_path, capsys):
    from conftest import user_error
    with Store(tmp_path / "c.sqlite3"):
        pass
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = user_error(capsys, "feedback", "export", "--db", tmp_path / "c.sqlite3", "--out", blocker / "fb")
    assert str(blocker) in line and blocker.read_text() == "x"


def test_text_that_is_not_unicode_is_a_user_error(tok):  # noqa: F811
    # Bytes that are not UTF-8 in argv or a file reach Python as lone surrogates (surrogateescape).
    bad = b"caf\xe9 \xed\xa0\x80".decode("utf-8", "surrogateescape")
    with pytest.raises(GptlabError, match="not valid Unicode"):
        tok.encode(bad)
    with pytest.raises(GptlabError, match="not valid Unicode"):
        tok.encode_batch(["fine", bad])
    with pytest.raises(TypeError):
        tok.encode(None)
    assert tok.encode("caf\u00e9 \U0001F600") == tok.encode_batch(["caf\u00e9 \U0001F600"])[0]


def test_ctrl_c_at_the_labeling_prompt_exits_at_once(tmp_path, tok):  # noqa: F811
    """A person pressing Ctrl-C while `gptlab label` waits for a ranking: the process ends (130) without
    waiting for Enter, and nothing is written for the prompt on screen."""
    import os
    import select
    import sys
    pty = pytest.importorskip("pty")
    from gptlab import runs
    from gptlab.model.gpt import GPT, GPTConfig
    run = tmp_path / "run"
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16)
    runs.write_run_config(run, cfg, tok, stage="sft")
    runs.save_tensors(run / runs.MODEL_FILE, runs.gpt_state(GPT(cfg)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    out = tmp_path / "rankings.jsonl"
    argv = [sys.executable, "-m", "gptlab", "label", "--prompts", str(prompts), "--policy", str(run), "-k", "2",
            "--out", str(out), "--max-new-tokens", "4", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    pid, fd = pty.fork()
    if pid == 0:   # the child: the labeling CLI on a terminal
        os.execvpe(sys.executable, argv, env)
    shown, deadline, status = b"", time.monotonic() + 60, None
    try:
        while b"q = quit: " not in shown and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                shown += os.read(fd, 65536)
        assert b"q = quit: " in shown, shown[-500:]
        time.sleep(0.2)
        os.write(fd, b"\x03")   # Ctrl-C, as the terminal sends it
        t = time.monotonic()
        while time.monotonic() - t < 10:
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                status = code
                break
            if select.select([fd], [], [], 0.05)[0]:
                try:
                    shown += os.read(fd, 65536)
                except OSError:
                    pass
        else:
            raise AssertionError("still waiting 10 s after Ctrl-C")
    finally:
        if status is None:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 130 and time.monotonic() - t < 5
    assert not out.exists() or out.read_text() == ""
