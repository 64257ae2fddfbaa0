"""``/health`` while the costliest allowed requests are served: does one request hold the others?

Starts ``gptlab serve`` in its own process (default: the soak's tiny random-weights GPT), then for each of
``serve_soak.worst_bodies`` sends it ``--repeat`` times while a separate prober process reads ``/health``
every 10 ms. Prints a Markdown table: the answer, the slowest of the requests, and /health p50/p99/max.
The prober and the server are separate processes, so no client work shares the server's GIL.

    python3 bench/serve_worst.py
    python3 bench/serve_worst.py --src /tmp/old-gptlab   # serve another source tree (before/after)
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from serve_soak import ROOT, pct, tiny_run, worst_bodies


def _probe(url: str, out: mp.Queue, stop) -> None:
    lat = []
    with httpx.Client(timeout=120) as http:
        while not stop.is_set():
            t = time.perf_counter()
            http.get(url + "/health")
            lat.append(time.perf_counter() - t)
            time.sleep(0.01)
    out.put(lat)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default=None, help="run folder to serve (default: a tiny random-weights GPT)")
    ap.add_argument("--src", default=str(ROOT), help="gptlab source tree to serve (default: this one)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-body-bytes", type=int, default=4 << 20)
    ap.add_argument("--max-messages", type=int, default=512)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gptlab-worst-"))
    run = Path(args.run) if args.run else tiny_run(tmp / "run")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": args.src}
    server = subprocess.Popen(
        [sys.executable, "-m", "gptlab", "serve", str(run), "--port", str(port), "--db", str(tmp / "chat.sqlite3"),
         "--log-level", "warning", "--max-body-bytes", str(args.max_body_bytes),
         "--max-messages", str(args.max_messages)], env=env, cwd=args.src)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                model = httpx.get(url + "/health", timeout=1).json()["model"]
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise SystemExit("server did not start")
        print(f"source: {args.src}\n")
        print("| request | answer | slowest of " + str(args.repeat) + " | /health p50 | p99 | max |")
        print("|---|---|---|---|---|---|")
        for name, (path, body, _) in worst_bodies(model, args.max_body_bytes, args.max_messages).items():
            out, stop = mp.Queue(), mp.Event()
            prober = mp.Process(target=_probe, args=(url, out, stop))
            prober.start()
            time.sleep(0.3)
            took, answer = [], ""
            with httpx.Client(timeout=300) as http:
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    r = http.post(url + path, content=body, headers={"content-type": "application/json"})
                    took.append(time.perf_counter() - t)
                    answer = f"{r.status_code} {r.json()['error']['code']}" if r.status_code >= 400 else str(r.status_code)
            time.sleep(0.2)
            stop.set()
            lat = out.get()
            prober.join()
            print(f"| {name} | {answer} | {max(took):.2f} s | {pct(lat, 50) * 1e3:.0f} ms | "
                  f"{pct(lat, 99) * 1e3:.0f} ms | {max(lat) * 1e3:.0f} ms |", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
