"""``gptlab serve RUN_DIR`` (OpenAI-compatible API + chat page) and ``gptlab feedback export``."""
from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

from gptlab.errors import GptlabError


def is_loopback(host: str) -> bool:
    """True when ``host`` only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False   # a name other than localhost may resolve anywhere: treat it as public


def check_bind(host: str, api_key: str | None) -> None:
    # Anyone who can reach the port could spend the GPU and read every stored conversation.
    if not is_loopback(host) and not api_key:
        raise GptlabError(f"--host {host} is reachable from other machines; set --api-key KEY "
                          "(or bind 127.0.0.1)")


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise GptlabError(f"{name} must be at least 1 (got {value})")
    return value


def _leave_a_core(device: str) -> None:
    """On CPU, keep one core for the HTTP event loop: OpenMP workers spin between ops and would
    otherwise starve it (measured: replies 3-10x slower on a 2-core machine)."""
    import torch

    from gptlab.device import pick_device
    if pick_device(device).type == "cpu" and torch.get_num_threads() > 1:
        torch.set_num_threads(torch.get_num_threads() - 1)


def run_serve(args) -> int:
    import uvicorn

    from gptlab.serve.app import Backend, HostPolicy, Limits, create_app
    from gptlab.serve.store import Store

    check_bind(args.host, args.api_key)
    if not 0 <= args.port <= 65535:
        raise GptlabError(f"--port must be in 0..65535 (got {args.port})")
    limits = Limits(max_body_bytes=_positive("--max-body-bytes", args.max_body_bytes),
                    max_messages=_positive("--max-messages", args.max_messages),
                    max_tokens_limit=_positive("--max-tokens-limit", args.max_tokens_limit))
    limits.default_max_tokens = min(limits.default_max_tokens, limits.max_tokens_limit)
    # Fail on a taken port now, before minutes of model loading.
    try:
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((args.host, args.port))
    except OSError as e:
        raise GptlabError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e})") from None
    max_batch = _positive("--max-batch", args.max_batch)
    from gptlab.tools import builtin_toolbox
    toolbox = builtin_toolbox(args.tools, args.index)   # a missing index fails now, not at the first call
    max_calls = _positive("--max-tool-calls", args.max_tool_calls)
    hosts = HostPolicy(args.host, args.allowed_host or ())
    store = Store(args.db)   # an unusable database fails now, before minutes of model loading
    try:
        _leave_a_core(args.device)
        backend = Backend.from_run(args.run_dir, device=args.device, max_batch=max_batch)
        backend.toolbox, backend.max_tool_calls = toolbox or None, max_calls
    except BaseException:
        store.close()
        raise
    app = create_app(backend, api_key=args.api_key, store=store, limits=limits, hosts=hosts)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {backend.model_id} (context {backend.context_size}, batch {args.max_batch}) on "
          f"http://{shown}:{args.port}/  (API: /v1, history: {store.path})", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        backend.close()
        store.close()
    return 0


def run_export(args) -> int:
    from gptlab.serve.store import Store, default_db_path, export_feedback

    db = Path(args.db) if args.db else default_db_path()
    if not db.is_file():
        raise GptlabError(f"{db}: no chat database (run `gptlab serve` and chat first, or pass --db)")
    with Store(db) as store:
        counts = export_feedback(store, args.out)
    print(f"{counts['pairs']} preference pairs -> {counts['pairs_path']}")
    print(f"{counts['sft']} liked conversations -> {counts['sft_path']}")
    return 0


def register(sub) -> None:
    from gptlab.tools import add_tool_args
    p = sub.add_parser(
        "serve", help="serve a run as an OpenAI-compatible API with a web chat page",
        description="Serve RUN_DIR: POST /v1/chat/completions, /v1/completions, GET /v1/models (works with "
        "the official openai client), and a chat page at / whose conversations, thumbs and comparisons "
        "are stored in SQLite (export them with `gptlab feedback export`).")
    p.add_argument("run_dir", help="run folder (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other "
                   "address needs --api-key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 and /api")
    p.add_argument("--allowed-host", action="append", metavar="NAME",
                   help="also answer requests for this Host name (repeatable; the bind address and "
                   "localhost always are; '*' answers any, e.g. behind a proxy that checks it)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--db", default=None, help="chat history database (default $GPTLAB_HOME/chat.sqlite3)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="largest request body (default 4 MiB)")
    p.add_argument("--max-messages", type=int, default=512, help="most messages in one chat request")
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask")
    add_tool_args(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run_serve)

    f = sub.add_parser("feedback", help="export chat feedback as training data",
                       description="Turn the chat page's thumbs and comparisons into training data.")
    fsub = f.add_subparsers(dest="feedback_command", metavar="ACTION")
    e = fsub.add_parser(
        "export", help="write PREFIX.pairs.jsonl (for rm/dpo) and PREFIX.sft.jsonl (for sft)",
        description="Preference pairs {prompt, chosen, rejected} from comparisons and from liked vs disliked "
        "answers to the same prompt -> PREFIX.pairs.jsonl; liked answers as {messages} -> PREFIX.sft.jsonl.")
    e.add_argument("--out", required=True, help="output prefix, e.g. data/feedback")
    e.add_argument("--db", default=None, help="chat history database (default $GPTLAB_HOME/chat.sqlite3)")
    e.set_defaults(func=run_export)
    f.set_defaults(func=lambda args: (f.print_help(), 2)[1])
