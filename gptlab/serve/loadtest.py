"""Serving load benchmark: N concurrent streaming chat clients against the OpenAI-compatible API.

``run_load(RUN_DIR)`` starts the same app ``gptlab serve`` runs (uvicorn on 127.0.0.1, a free port, in a
thread of this process) or talks to a server already running at a base URL, then for each concurrency
level runs that many clients at once. Each client sends ``requests_per_client`` streaming
``POST /v1/chat/completions`` requests back to back and times them from the client's side:

* time to first token (TTFT): request sent -> first SSE chunk carrying answer text;
* latency: request sent -> ``data: [DONE]``;
* tokens: the server's own ``usage.completion_tokens`` (``stream_options.include_usage``).

Every request sets ``ignore_eos: true`` (a gptlab extension, vLLM's name for it) so answers are exactly
``max_tokens`` long whatever the weights say: levels then compare equal work. Aggregate tokens/s is all
completion tokens of a level divided by the level's wall time (first request sent -> last answer done).

Bounded: loopback only when the server is started here, a fixed number of requests per level, and a
time limit per level (requests still running then are cancelled and the row says so).
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

from gptlab.errors import GptlabError

DEFAULT_PROMPT = "Tell me a story about a king and his three daughters."


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated q-th percentile (0..100) of ``values``; None when empty."""
    if not values:
        return None
    xs = sorted(values)
    at = (len(xs) - 1) * q / 100.0
    lo = int(at)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (at - lo)


# ----- one streaming request -------------------------------------------------------------------------------
# A minimal HTTP/1.1 client on asyncio streams rather than httpx: the clients share this process (and its
# GIL) with the in-process server, and httpx/anyio's per-read overhead was measured to cost as much CPU as
# the model itself at 8 clients, capping what the benchmark could show. This one does a few cheap calls
# per SSE event.
async def _chunks(reader: asyncio.StreamReader, chunked: bool):
    """The response body piece by piece (chunked transfer encoding, or until the server closes)."""
    if not chunked:
        while piece := await reader.read(65536):
            yield piece
        return
    while True:
        size_line = await reader.readline()
        if not size_line:
            raise GptlabError("the server closed the connection mid-answer")
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        yield (await reader.readexactly(size + 2))[:-2]


async def _one(host: str, port: int, head: bytes, payload: bytes) -> dict:
    """Send one streaming chat request and time it; raises GptlabError on an HTTP or SSE error."""
    t0 = time.perf_counter()
    ttft, tokens, chunks, finish = None, None, 0, None
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head + payload)
        await writer.drain()
        status_line = await reader.readline()
        parts = status_line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            raise GptlabError(f"not an HTTP answer: {status_line[:80]!r}")
        status, headers = int(parts[1]), {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip().lower()
        body = _chunks(reader, headers.get("transfer-encoding") == "chunked")
        if status != 200:
            text = b"".join([p async for p in body]).decode(errors="replace")
            raise GptlabError(f"server answered {status}: {text[:200]}")
        buf = b""
        async for piece in body:
            buf += piece
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if not event.startswith(b"data: "):
                    continue
                data = event[6:]
                if data == b"[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    raise GptlabError(f"server error while streaming: {obj['error'].get('message')}")
                if obj.get("usage"):
                    tokens = obj["usage"]["completion_tokens"]
                for c in obj.get("choices") or []:
                    if (c.get("delta") or {}).get("content"):
                        chunks += 1
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                    finish = c.get("finish_reason") or finish
    finally:
        writer.close()
    latency = time.perf_counter() - t0
    return {"ttft": ttft if ttft is not None else latency, "latency": latency,
            "tokens": tokens if tokens is not None else chunks, "chunks": chunks, "finish": finish}


async def _level(url: str, headers: dict, body: dict, clients: int, requests_per_client: int,
                 time_limit: float) -> dict:
    """``clients`` concurrent clients, each sending ``requests_per_client`` requests back to back."""
    from urllib.parse import urlsplit
    where = urlsplit(url)
    host, port = where.hostname, where.port or 80
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    done: list[dict] = []
    errors: list[str] = []

    async def client(i: int):
        for j in range(requests_per_client):
            # A seed per request: reproducible, yet clients do not all get the same text.
            payload = json.dumps({**body, "seed": 1000 * i + j}).encode()
            head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {where.netloc}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                    f"Accept: text/event-stream\r\nConnection: close\r\n{extra}\r\n").encode("latin-1")
            try:
                done.append(await _one(host, port, head, payload))
            except (GptlabError, OSError, ValueError, asyncio.IncompleteReadError) as e:
                errors.append(str(e) or type(e).__name__)

    start = time.perf_counter()
    tasks = [asyncio.create_task(client(i)) for i in range(clients)]
    _, pending = await asyncio.wait(tasks, timeout=time_limit)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - start
    ttfts = [d["ttft"] for d in done]
    lat = [d["latency"] for d in done]
    tokens = sum(d["tokens"] for d in done)
    ms = lambda v: None if v is None else round(1000 * v, 1)   # noqa: E731
    return {
        "clients": clients, "requests": len(done), "errors": len(errors),
        "timed_out": bool(pending), "tokens": tokens, "seconds": round(wall, 4),
        "tok_s": round(tokens / wall, 2) if wall > 0 else 0.0,
        "ttft_p50_ms": ms(percentile(ttfts, 50)), "ttft_p95_ms": ms(percentile(ttfts, 95)),
        "latency_p50_ms": ms(percentile(lat, 50)),
        "short_answers": sum(1 for d in done if d["tokens"] != body["max_tokens"]),
        "first_error": errors[0] if errors else None,
    }


# ----- a server in this process ------------------------------------------------------------------------------
class _LocalServer:
    """``gptlab serve``'s app under uvicorn in a daemon thread, on 127.0.0.1 and a free port."""

    def __init__(self, backend):
        import uvicorn

        from gptlab.serve.app import Limits, create_app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        app = create_app(backend, limits=Limits())
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started and time.time() < deadline and self.thread.is_alive():
            time.sleep(0.01)
        if not self.server.started:
            raise GptlabError("the in-process server did not start")
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def _model_id(url: str, headers: dict) -> str:
    import httpx
    try:
        r = httpx.get(f"{url}/v1/models", headers=headers, timeout=10)
    except httpx.HTTPError as e:
        raise GptlabError(f"cannot reach {url} ({e})") from None
    if r.status_code != 200:
        raise GptlabError(f"{url}/v1/models answered {r.status_code}")
    return r.json()["data"][0]["id"]


# ----- the benchmark -------------------------------------------------------------------------------------------
def run_load(run_dir_or_backend, clients=(1, 8, 32), max_tokens: int = 64, requests_per_client: int = 4,
             max_batch: int = 32, prompt: str = DEFAULT_PROMPT, temperature: float = 1.0,
             time_limit: float = 300.0, api_key: str | None = None, device: str = "auto",
             client_process: bool = True, show: bool = True) -> list[dict]:
    """Measure the server at each concurrency level in ``clients``; print a table and return its rows.

    ``run_dir_or_backend``: a run folder (served here), an ``http://`` base URL of a running server,
    or a Backend-like object (see gptlab.serve.app.Backend; served here, not closed). ``time_limit``
    bounds each level in seconds. ``client_process``: drive the clients from a child Python process
    (default), as real clients would be, so their parsing never holds the server process's GIL.
    Rows: clients, requests, errors, timed_out, tokens, seconds, tok_s,
    ttft_p50_ms, ttft_p95_ms, latency_p50_ms, short_answers, first_error, speedup (tok_s over the
    1-client level's, when that level ran) and, when served here, decode_steps, mean_batch (rows per
    decode step) and step_ms (wall time per decode step).
    """
    levels = [int(c) for c in clients]
    if not levels or min(levels) < 1:
        raise GptlabError("clients must be a non-empty list of positive integers")
    if max_tokens < 1 or requests_per_client < 1 or max_batch < 1:
        raise GptlabError("max_tokens, requests_per_client and max_batch must be at least 1")
    if time_limit <= 0:
        raise GptlabError("time_limit must be positive")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    target = run_dir_or_backend
    if isinstance(target, str) and target.startswith("https://"):
        raise GptlabError("the load test speaks plain http:// only (run it next to the server)")
    if isinstance(target, str) and target.startswith("http://"):
        url = target.rstrip("/")
        if url.endswith("/v1"):
            url = url[:-3]
        return _measure(url, headers, _model_id(url, headers), levels, max_tokens, requests_per_client,
                        prompt, temperature, time_limit, show, None, client_process)

    import torch

    from gptlab.serve.app import Backend
    from gptlab.serve.commands import _leave_a_core
    threads = torch.get_num_threads()
    own = isinstance(target, (str, Path))
    if own:
        if not Path(target).is_dir():
            raise GptlabError(f"{target}: no such run folder")
        _leave_a_core(device)   # exactly what `gptlab serve` does before loading the model
        backend = Backend.from_run(target, device=device, max_batch=max_batch)
    else:
        _leave_a_core(device)
        backend = target
    try:
        with _LocalServer(backend) as server:
            return _measure(server.url, headers, backend.model_id, levels, max_tokens, requests_per_client,
                            prompt, temperature, time_limit, show, getattr(backend, "scheduler", None),
                            client_process)
    finally:
        if own:
            backend.close()
        torch.set_num_threads(threads)


def _measure(url, headers, model, levels, max_tokens, requests_per_client, prompt, temperature,
             time_limit, show, scheduler, client_process) -> list[dict]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": max_tokens,
            "temperature": temperature, "ignore_eos": True}
    if show:
        print(f"load test: {url} model {model}, {max_tokens} tokens per answer, "
              f"{requests_per_client} requests per client", flush=True)
    # Warm-up (first-call costs: allocator, lazy imports): one short request, not counted anywhere.
    asyncio.run(_level(url, headers, {**body, "max_tokens": min(4, max_tokens)}, 1, 1, time_limit))
    rows = []
    for n in levels:
        spec = {"url": url, "headers": headers, "body": body, "clients": n,
                "requests_per_client": requests_per_client, "time_limit": time_limit}
        steps = getattr(scheduler, "steps", None)
        row = _level_in_child(spec) if client_process else asyncio.run(_spec_level(spec))
        if steps is not None:   # served here: how full the decode batches really were
            steps = scheduler.steps - steps
            row["decode_steps"] = steps
            # The first token of each answer comes from its prefill, the rest from decode steps.
            row["mean_batch"] = round((row["tokens"] - row["requests"]) / steps, 2) if steps else None
            row["step_ms"] = round(1000 * row["seconds"] / steps, 2) if steps else None
        rows.append(row)
        if show:
            print(f"  {n} client(s): {row['tok_s']} tok/s, {row['requests']} requests", flush=True)
    base = next((r["tok_s"] for r in rows if r["clients"] == 1 and r["tok_s"] > 0), None)
    for r in rows:
        r["speedup"] = round(r["tok_s"] / base, 2) if base else None
    if show:
        print(format_table(rows))
    return rows


async def _spec_level(spec: dict) -> dict:
    return await _level(spec["url"], spec["headers"], spec["body"], spec["clients"], spec["requests_per_client"],
                        spec["time_limit"])


def _level_in_child(spec: dict) -> dict:
    """One level driven from a child process (``python -m gptlab.serve.loadtest --drive``): the spec,
    API key included, goes through stdin, the row comes back as JSON on stdout."""
    import os
    import subprocess
    import sys
    root = str(Path(__file__).resolve().parents[2])   # so the child imports this same gptlab
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    try:
        done = subprocess.run([sys.executable, "-m", "gptlab.serve.loadtest", "--drive"], input=json.dumps(spec),
                              capture_output=True, text=True, env=env, timeout=spec["time_limit"] + 60)
    except subprocess.TimeoutExpired:
        raise GptlabError("the load-test client process did not finish in time") from None
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise GptlabError(f"the load-test client process failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of run_load's rows."""
    cols = [("clients", "clients"), ("requests", "requests"), ("errors", "errors"), ("tokens", "tokens"),
            ("seconds", "wall s"), ("tok_s", "tok/s"), ("speedup", "x vs 1"),
            ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p95_ms", "TTFT p95 ms"), ("latency_p50_ms", "latency p50 ms"),
            ("mean_batch", "rows/step"), ("step_ms", "ms/step")]
    cell = lambda v: "-" if v is None else str(v)   # noqa: E731
    table = [[h for _, h in cols]] + [[cell(r.get(k)) for k, _ in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"{r['clients']} clients: stopped at the time limit" for r in rows if r.get("timed_out")]
    notes += [f"{r['clients']} clients: {r['errors']} failed requests (first: {r['first_error']})"
              for r in rows if r.get("errors")]
    return "\n".join(lines + notes)


def main(argv=None) -> int:
    import argparse
    import sys
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--drive"]:   # internal: the client side of one level (see _level_in_child)
        print(json.dumps(asyncio.run(_spec_level(json.loads(sys.stdin.read())))))
        return 0
    ap = argparse.ArgumentParser(prog="python -m gptlab.serve.loadtest",
                                 description="Concurrent streaming chat clients against gptlab's OpenAI API.")
    ap.add_argument("target", help="run folder (served in-process on 127.0.0.1) or http://host:port of a server")
    ap.add_argument("--clients", default="1,8,32", help="concurrency levels, comma-separated (default 1,8,32)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (EOS ignored; default 64)")
    ap.add_argument("--requests-per-client", type=int, default=4, help="requests each client sends (default 4)")
    ap.add_argument("--max-batch", type=int, default=32, help="scheduler batch slots (default 32)")
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds per level at most (default 300)")
    ap.add_argument("--api-key", default=None, help="bearer key of a running server")
    ap.add_argument("--in-process-clients", action="store_true",
                    help="drive the clients from this process instead of a child process")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    try:
        levels = [int(x) for x in args.clients.split(",") if x.strip()]
    except ValueError:
        raise GptlabError("--clients must be comma-separated integers") from None
    rows = run_load(args.target, clients=levels, max_tokens=args.max_tokens,
                    requests_per_client=args.requests_per_client, max_batch=args.max_batch,
                    time_limit=args.time_limit, api_key=args.api_key,
                    client_process=not args.in_process_clients)
    if args.json:
        from gptlab.io import atomic_write_json
        atomic_write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    import sys
    try:
        sys.exit(main())
    except GptlabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
