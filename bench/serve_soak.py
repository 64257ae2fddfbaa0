"""Soak test for ``gptlab serve``: mixed traffic for a while, watching memory, latency and errors.

Starts ``gptlab serve`` as its own process (so its RSS is the server's alone) on a run folder (default: a
tiny random-weights GPT made here, so generation is real but cheap), then runs ``--clients`` workers for
``--minutes``. Each worker picks, at random, one of:

* ``stream``: a streamed chat completion read to the end;
* ``disconnect``: a streamed chat completion dropped after a few chunks;
* ``large``: one of ``worst_bodies``: the largest allowed chat body (``--max-messages`` messages filling
  ``--max-body-bytes``), a ~4 MB ``/v1/completions`` prompt, system prompt, tool list or list of token
  ids (all answered 400: they can never fit), or a whole long history with tools (answered from its end);
* ``web``: the chat page's flow: a conversation, a streamed message, a thumbs up/down, sometimes a
  side-by-side comparison and its choice.

A probe reads ``/health`` every 0.25 s. Every ``--window`` seconds a row records the server's RSS, p50/p99
latency of the requests finished in that window, the /health p99, and errors by kind (5xx, transport
errors, unexpected 4xx). At the end the database is compared with what the clients were told was stored
(lost feedback rows), and the rows go to JSON and a PNG.

    python3 bench/serve_soak.py --minutes 5 --out docs/img/serve_soak.png
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tiny_run(folder: Path) -> Path:
    """A random-weights GPT with a chat-token tokenizer: real engine work at CPU-friendly cost."""
    from gptlab.model.gpt import GPT, GPTConfig
    from gptlab.tokenizer import Tokenizer
    from gptlab import runs as ckpt
    text = ("The quick brown fox jumps over the lazy dog. Hello there, how are you today? "
            "Pack my box with five dozen liquor jugs. ") * 200
    tok = Tokenizer.train([text], vocab_size=512)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=2, n_head=4, n_embd=64)
    ckpt.write_run_config(folder, cfg, tok, stage="sft")
    ckpt.save_tensors(folder / "model.safetensors", ckpt.gpt_state(GPT(cfg)))
    return folder


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round((len(xs) - 1) * q / 100)))]


class Stats:
    def __init__(self):
        self.lat: list[tuple[str, float]] = []
        self.health: list[float] = []
        # "bad_reply": anything else that went wrong with an answer (an SSE event that is not JSON...)
        self.errors = {"5xx": 0, "transport": 0, "4xx": 0, "bad_reply": 0}
        self.first_bad: str | None = None
        self.total_errors = dict(self.errors)
        self.done = 0
        self.kinds: dict[str, int] = {}
        self.feedback_told: set[int] = set()     # message ids the server said it rated
        self.choices_told: set[int] = set()      # comparison ids the server said it decided

    def error(self, kind: str) -> None:
        self.errors[kind] += 1
        self.total_errors[kind] += 1

    def take(self) -> tuple[list, list, dict]:
        out = (self.lat, self.health, self.errors)
        self.lat, self.health, self.errors = [], [], {k: 0 for k in self.errors}
        return out


def check(r: httpx.Response, stats: Stats, expect=(200,)) -> bool:
    if r.status_code >= 500:
        stats.error("5xx")
    elif r.status_code not in expect:
        stats.error("4xx")
    return r.status_code in expect


async def sse(http: httpx.AsyncClient, path: str, body: dict, stats: Stats, headers=None, stop_after=None):
    """POST and read an SSE stream; return the parsed events (None on an error status)."""
    events = []
    async with http.stream("POST", path, json=body, headers=headers) as r:
        if not check(r, stats):
            await r.aread()
            return None
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
                if stop_after is not None and len(events) >= stop_after:
                    return events   # leaving the block closes the connection: a disconnect
    return events


def worst_bodies(model: str, max_body_bytes: int = 4 << 20, max_messages: int = 512) -> dict:
    """The costliest requests the limits allow, by name: (path, body, expected status). Each was once a
    way to hold the server (quadratic fitting; tokenising a huge system prompt, tool list or history on
    the GIL; parsing millions of JSON values)."""
    per = (max_body_bytes - 8192) // max_messages - 48
    words = "word " * ((max_body_bytes - 8192) // 5)

    def chat(**kw) -> bytes:
        return json.dumps({"model": model, "max_tokens": 8, **kw}).encode()
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * (per // 5)}
             for i in range(max_messages)]
    n_tools = max(1, max_body_bytes // 8400)
    return {
        "chat: max messages filling the body": ("/v1/chat/completions", chat(messages=turns), 400),
        "completions: one prompt filling the body": (
            "/v1/completions", json.dumps({"model": model, "max_tokens": 8, "prompt": words}).encode(), 400),
        "chat: a system prompt filling the body": ("/v1/chat/completions", chat(messages=[
            {"role": "system", "content": words}, {"role": "user", "content": "hi"}]), 400),
        "chat: tool descriptions filling the body": ("/v1/chat/completions", chat(
            messages=[{"role": "user", "content": "hi"}], tools=[
                {"type": "function", "function": {"name": f"f{i}", "description": "word " * 1600}}
                for i in range(n_tools)]), 400),
        "chat with tools: a whole long history": ("/v1/chat/completions", chat(
            tool_choice="none", tools=[{"type": "function", "function": {"name": "f"}}],
            messages=turns[:max_messages - 2] + [{"role": "user", "content": "hi"}]), 200),
        "completions: token ids filling the body": (
            "/v1/completions", b'{"model": %s, "max_tokens": 8, "prompt": [' % json.dumps(model).encode()
            + b"0," * ((max_body_bytes - 200) // 2) + b"0]}", 400),
    }


async def worker(url: str, model: str, token: str, big: list, stats: Stats, deadline: float, seed: int) -> None:
    rng = random.Random(seed)
    page = {"X-CSRF-Token": token}
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        while time.monotonic() < deadline:
            kind = rng.choices(["stream", "disconnect", "large", "web"], weights=[4, 2, 1, 3])[0]
            t = time.perf_counter()
            try:
                if kind in ("stream", "disconnect"):
                    body = {"model": model, "stream": True, "max_tokens": rng.randint(16, 96),
                            "messages": [{"role": "user", "content": f"Tell me about item {rng.randint(0, 999)}"}]}
                    await sse(http, "/v1/chat/completions", body, stats,
                              stop_after=3 if kind == "disconnect" else None)
                elif kind == "large":
                    path, raw, status = rng.choice(big)
                    r = await http.post(path, content=raw, headers={"content-type": "application/json"})
                    check(r, stats, expect=(status,))
                else:
                    r = await http.post("/api/conversations", json={}, headers=page)
                    if check(r, stats):
                        cid = r.json()["id"]
                        ev = await sse(http, f"/api/conversations/{cid}/messages",
                                       {"content": "Hello there", "max_tokens": 24}, stats, headers=page)
                        msg = ev[-1].get("message") if ev else None
                        if msg:
                            r = await http.post(f"/api/messages/{msg['id']}/feedback",
                                                json={"rating": rng.choice([1, -1])}, headers=page)
                            if check(r, stats):
                                stats.feedback_told.add(msg["id"])
                        if rng.random() < 0.3:
                            ev = await sse(http, f"/api/conversations/{cid}/compare",
                                           {"content": "Which is better?", "max_tokens": 16}, stats, headers=page)
                            comp = ev[-1].get("comparison") if ev else None
                            if comp:
                                r = await http.post(f"/api/comparisons/{comp['id']}/choice",
                                                    json={"choice": rng.choice("ab")}, headers=page)
                                if check(r, stats):
                                    stats.choices_told.add(comp["id"])
            except httpx.HTTPError:
                stats.error("transport")
                continue
            except Exception as e:   # counted, never the end of this client (which would look like calm)
                stats.error("bad_reply")
                stats.first_bad = stats.first_bad or f"{kind}: {type(e).__name__}: {e}"
                continue
            stats.lat.append((kind, time.perf_counter() - t))
            stats.done += 1
            stats.kinds[kind] = stats.kinds.get(kind, 0) + 1


async def probe(url: str, stats: Stats, deadline: float) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        while time.monotonic() < deadline:
            t = time.perf_counter()
            try:
                r = await http.get("/health")
                check(r, stats)
            except httpx.HTTPError:
                stats.error("transport")
            stats.health.append(time.perf_counter() - t)
            await asyncio.sleep(0.25)


async def soak(url: str, pid: int, model: str, token: str, args) -> tuple[list[dict], Stats]:
    big = list(worst_bodies(model, args.max_body_bytes, args.max_messages).values())
    stats = Stats()
    start = time.monotonic()
    deadline = start + args.minutes * 60
    tasks = [asyncio.create_task(worker(url, model, token, big, stats, deadline, i))
             for i in range(args.clients)]
    tasks.append(asyncio.create_task(probe(url, stats, deadline)))
    rows = []
    while any(not t.done() for t in tasks):
        await asyncio.wait(tasks, timeout=args.window)   # one row per window, and one when all are done
        lat, health, errors = stats.take()
        xs = [s for _, s in lat]
        row = {"t": round(time.monotonic() - start, 1), "rss_mb": round(rss_mb(pid), 1), "requests": len(xs),
               "p50_s": pct(xs, 50), "p99_s": pct(xs, 99), "health_p99_s": pct(health, 99),
               "health_max_s": max(health) if health else None, **{f"err_{k}": v for k, v in errors.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if time.monotonic() > deadline + 120:
            break
    await asyncio.gather(*tasks, return_exceptions=True)
    return rows, stats


def plot(rows: list[dict], out: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gptlab.plots import save_figure
    t = [r["t"] / 60 for r in rows]
    fig, ax = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    ax[0].plot(t, [r["rss_mb"] for r in rows], color="tab:blue")
    ax[0].set_ylabel("server RSS (MB)")
    ax[0].set_ylim(bottom=0)
    for key, style in (("p50_s", "-"), ("p99_s", "--"), ("health_p99_s", ":")):
        ax[1].plot(t, [r[key] if r[key] is not None else float("nan") for r in rows], style, label=key[:-2])
    ax[1].set_yscale("log")
    ax[1].set_ylabel("latency (s)")
    ax[1].legend(loc="upper right", fontsize=8)
    for key in ("err_5xx", "err_transport", "err_4xx", "err_bad_reply"):
        ax[2].plot(t, [r[key] for r in rows], marker=".", label=key[4:])
    ax[2].set_ylabel("errors per window")
    ax[2].set_xlabel("minutes")
    ax[2].legend(loc="upper right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default=None, help="run folder to serve (default: a tiny random-weights GPT)")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--window", type=float, default=10.0, help="seconds per row")
    ap.add_argument("--max-body-bytes", type=int, default=4 << 20)
    ap.add_argument("--max-messages", type=int, default=512)
    ap.add_argument("--out", default="docs/img/serve_soak.png")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gptlab-soak-"))
    run = Path(args.run) if args.run else tiny_run(tmp / "run")
    db = tmp / "chat.sqlite3"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "gptlab", "serve", str(run), "--port", str(port), "--db", str(db),
                               "--log-level", "warning", "--max-body-bytes", str(args.max_body_bytes),
                               "--max-messages", str(args.max_messages)], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                health = httpx.get(url + "/health", timeout=1).json()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise SystemExit("server did not start")
        token = re.search(r'name="gptlab-csrf" content="([^"]+)"', httpx.get(url + "/").text).group(1)
        rows, stats = asyncio.run(soak(url, server.pid, health["model"], token, args))
    finally:
        server.terminate()
        server.wait(timeout=30)
    con = sqlite3.connect(db)
    rated = {r[0] for r in con.execute("SELECT message_id FROM feedback")}
    decided = {r[0] for r in con.execute("SELECT id FROM comparisons WHERE choice IS NOT NULL")}
    con.close()
    warm = [r["rss_mb"] for r in rows[max(1, len(rows) // 5):]]
    summary = {
        "minutes": args.minutes, "clients": args.clients, "requests": stats.done, "by_kind": stats.kinds,
        "errors": stats.total_errors, "first_bad_reply": stats.first_bad, "feedback_rows_lost": len(stats.feedback_told - rated),
        "choices_lost": len(stats.choices_told - decided), "feedback_told": len(stats.feedback_told),
        "rss_after_warmup_mb": [min(warm), max(warm)] if warm else None,
        "rss_spread_after_warmup": (max(warm) / min(warm) - 1) if warm else None,
        "p50_s": pct([r["p50_s"] for r in rows if r["p50_s"] is not None], 50),
        "p99_s_worst_window": max((r["p99_s"] for r in rows if r["p99_s"] is not None), default=None),
        "health_max_s": max((r["health_max_s"] for r in rows if r["health_max_s"] is not None), default=None),
    }
    print(json.dumps(summary, indent=2))
    out = Path(args.out)
    from gptlab.io import atomic_write_json
    atomic_write_json(out.with_suffix(".json"), {"summary": summary, "rows": rows})
    plot(rows, out, f"gptlab serve soak: {args.minutes:g} min, {args.clients} clients, mixed traffic "
         f"({stats.done} requests, {stats.total_errors['5xx']} 5xx)")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    ok = stats.total_errors["5xx"] == stats.total_errors["bad_reply"] == summary["feedback_rows_lost"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
