"""The chat server: an OpenAI-compatible HTTP API plus the web page's own endpoints.

* ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``: what the official ``openai`` client
  (and anything built on it) speaks, streaming included, so existing tools work against a gptlab model.
* ``/api/...``: conversations, messages, regenerate, thumbs, side-by-side comparisons for the page at
  ``/``; every reply and rating lands in SQLite (``store.py``) and can be exported as training data.

Every request shares one model through the engine's continuous-batching scheduler; a client that goes
away mid-answer has its slot freed at once. Requests are validated here by hand (not by pydantic) so that
each mistake gets OpenAI's error shape, a precise ``param`` and a 4xx status: bad input never yields a 500.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import math
import queue
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from gptlab.errors import GptlabError
from gptlab.serve.store import Store
from gptlab.tokenizer.chat_template import fit_prompt

STATIC = Path(__file__).parent / "static"
PUBLIC_PATHS = ("/", "/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/favicon.ico")


@dataclass
class Limits:
    """What one request may ask for (protects a shared model from a single greedy client)."""
    max_body_bytes: int = 4 << 20
    max_messages: int = 512
    max_tokens_limit: int = 2048      # largest max_tokens a request may ask for
    default_max_tokens: int = 512     # when a request does not say
    max_n: int = 8                    # choices per request
    max_prompts: int = 16             # legacy completions: prompts per request


# ----- errors in OpenAI's shape --------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# ----- the model behind the server ----------------------------------------------------------------
class Backend:
    """What the server needs from a model: its id, context size, tokenizer and a batching scheduler.

    Tests inject any object with the same attributes (``model_id``, ``context_size``, ``tok``,
    ``max_batch``, ``busy_slots``, ``submit(ids, params)``, ``close()``).
    """

    def __init__(self, engine, model_id: str, max_batch: int = 16):
        self.engine = engine
        self.tok = engine.tok
        self.model_id = model_id
        self.context_size = int(engine.model.config.block_size)
        self.max_batch = max_batch
        self.created = int(time.time())
        self.scheduler = engine.scheduler(max_batch=max_batch)

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto", max_batch: int = 16) -> "Backend":
        from gptlab.device import pick_device
        from gptlab.generate.engine import Engine
        from gptlab.runs import load_run
        dev = pick_device(device)
        model, tok, _ = load_run(run_dir, dev)
        return cls(Engine(model, tok), Path(run_dir).resolve().name, max_batch)

    @property
    def busy_slots(self) -> int:
        return self.scheduler.busy_slots

    def submit(self, prompt_ids: list[int], params):
        return self.scheduler.submit(prompt_ids, params)

    def close(self) -> None:
        self.scheduler.close()


def has_chat_template(tok) -> bool:
    from gptlab.tokenizer import ASSISTANT_END, ASSISTANT_START, USER_END, USER_START
    return all(tok.special_id(t) is not None for t in (USER_START, USER_END, ASSISTANT_START, ASSISTANT_END))


# ----- request validation ---------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not (_is_int(v) or isinstance(v, float)) or not math.isfinite(v):
        raise bad(f"'{name}' must be a number", name, "invalid_type")
    if v < lo or v > hi or (lo_open and v == lo):
        rng = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise bad(f"'{name}' must be in {rng}, got {v}", name)
    return float(v)


def _integer(body: dict, name: str, default, lo: int, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v):
        raise bad(f"'{name}' must be an integer", name, "invalid_type")
    if v < lo or (hi is not None and v > hi):
        raise bad(f"'{name}' must be between {lo} and {hi}, got {v}" if hi is not None
                  else f"'{name}' must be >= {lo}, got {v}", name)
    return v


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be a boolean", name, "invalid_type")
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(v) > 4:
        raise bad("'stop' may hold at most 4 sequences", "stop")
    return [s for s in v if s]


@dataclass
class Sampling:
    """Sampling options shared by both completion endpoints (validated)."""
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int | None
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool
    ignore_eos: bool = False

    def params(self, index: int):
        from gptlab.generate.engine import SamplingParams
        # Choice i gets seed + i: reproducible, yet n > 1 samples differ from each other.
        seed = None if self.seed is None else (self.seed + index) % (1 << 63)
        return SamplingParams(max_new_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, stop=list(self.stop), seed=seed, ignore_eos=self.ignore_eos)


def parse_sampling(body: dict, limits: Limits, min_tokens: int = 1) -> Sampling:
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise bad("logprobs are not supported by this server", "logprobs")
    max_tokens = _integer(body, "max_completion_tokens", None, min_tokens, limits.max_tokens_limit)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", None, min_tokens, limits.max_tokens_limit)
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, limits.max_tokens_limit)
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = _bool(opts or {}, "include_usage")
    seed = _integer(body, "seed", None, -(1 << 63), (1 << 64) - 1)
    return Sampling(
        n=_integer(body, "n", 1, 1, limits.max_n),
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=_integer(body, "top_k", None, 1),   # an extension; OpenAI has none
        stop=_stop(body), seed=seed, stream=stream, include_usage=stream and include_usage,
        # An extension (vLLM's name): keep going past end-of-text/end-of-turn, so load tests get answers
        # of exactly max_tokens tokens.
        ignore_eos=_bool(body, "ignore_eos"))


def parse_messages(raw, limits: Limits) -> list[dict]:
    """OpenAI messages -> gptlab's [{role, content}] (leading system/developer turns merged into one)."""
    if not isinstance(raw, list):
        raise bad("'messages' must be a list", "messages", "invalid_type")
    if not raw:
        raise bad("'messages' must not be empty", "messages")
    if len(raw) > limits.max_messages:
        raise bad(f"'messages' holds {len(raw)} messages; the limit is {limits.max_messages}", "messages")
    out: list[dict] = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object with 'role' and 'content'", where, "invalid_type")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise bad(f"{where}.role {role!r} is not supported (system, developer, user, assistant)",
                      f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):   # content parts: only text is understood
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"{where}.content[{j}]: only text parts are supported", f"{where}.content")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise bad(f"{where}.content must be a string", f"{where}.content", "invalid_type")
        if role == "system":
            if out and out[-1]["role"] != "system":
                raise bad(f"{where}: system messages may only come first", f"{where}.role")
            if out:
                out[-1]["content"] += "\n\n" + content
                continue
        out.append({"role": role, "content": content})
    if all(m["role"] == "system" for m in out):
        raise bad("'messages' needs at least one user or assistant message", "messages")
    return out


def check_model(body: dict, backend) -> str:
    model = body.get("model")
    if model is None:
        raise bad("you must provide a 'model' parameter", "model", "missing_required_parameter")
    if not isinstance(model, str):
        raise bad("'model' must be a string", "model", "invalid_type")
    if model != backend.model_id:
        raise APIError(404, f"The model '{model}' does not exist (this server serves '{backend.model_id}')",
                       param="model", code="model_not_found")
    return model


def fit_chat(backend, messages: list[dict], max_tokens: int) -> tuple[list[int], int]:
    """Prompt ids for ``messages`` and how many old turns were dropped to fit the context window.

    Aim to leave room for the answer (up to a quarter of the window); if only the bare prompt fits, use
    that (the engine slides its window while answering); if not even the last message fits: 400.
    """
    if not has_chat_template(backend.tok):
        raise bad("this model's tokenizer has no chat tokens; use /v1/completions", "messages")
    ctx = backend.context_size
    for budget in (ctx - min(max_tokens, ctx // 4), ctx - 1):
        try:
            fitted = fit_prompt(backend.tok, messages, budget)
            return fitted.ids, fitted.dropped
        except GptlabError:
            continue
    raise bad(f"This model's maximum context length is {ctx} tokens and the last message alone does not "
              "fit; shorten it", "messages", "context_length_exceeded")


# ----- driving the scheduler from asyncio ----------------------------------------------------------
class ClientGone(Exception):
    """The HTTP client disconnected; its requests have been cancelled."""


async def drain(reqs: list, request: Request | None):
    """Yield (index, TokenEvent) from several engine requests as events arrive.

    Polls the requests' queues with a short back-off instead of parking a thread per request in an
    executor (a handful of threads would otherwise cap concurrency), and checks every ~50 ms whether the
    client is still there: if not, every request is cancelled (freeing its batch slot now) and
    ClientGone is raised.
    """
    loop = asyncio.get_running_loop()
    live = set(range(len(reqs)))
    idle, checked = 0.0005, loop.time()
    try:
        while live:
            got = False
            for i in sorted(live):
                while True:
                    try:
                        ev = reqs[i].events.get_nowait()
                    except queue.Empty:
                        break
                    got = True
                    if ev.finish_reason is not None:
                        live.discard(i)
                    yield i, ev
                    if ev.finish_reason is not None:
                        break
            if request is not None and loop.time() - checked > 0.05:
                checked = loop.time()
                if await request.is_disconnected():
                    raise ClientGone()
            if got:
                idle = 0.0005
            else:
                await asyncio.sleep(idle)
                idle = min(idle * 2, 0.01)
    finally:
        for r in reqs:
            r.cancel()   # a no-op for finished requests; frees the slot of any other


async def completion_tokens(req, text: str, tok) -> int:
    """Generated-token count: the engine's own record (set just after the last event), else re-encode."""
    for _ in range(20):
        if getattr(req, "completion", None) is not None:
            return len(req.completion.ids)
        await asyncio.sleep(0.001)
    return len(tok.encode(text))


def sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ----- the app --------------------------------------------------------------------------------------
class GuardMiddleware:
    """API-key check and body-size limit, before any route reads a byte of the body.

    The body is read here (stopping at the limit) and replayed to the app; later ``receive`` calls go
    to the server so disconnects are still seen while streaming.
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and (path.startswith("/v1") or path.startswith("/api")):
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                msg = "Incorrect API key provided." if given else "Missing API key (Authorization: Bearer ...)."
                return await error_response(401, msg, code="invalid_api_key")(scope, receive, send)
        too_big = error_response(413, f"Request body larger than {self.max_body} bytes.",
                                 code="request_too_large", headers={"Connection": "close"})
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            if not length.isdigit():
                return await error_response(400, "Bad Content-Length header.")(scope, receive, send)
            return await too_big(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return   # client gone before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await too_big(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def read_json(request: Request) -> dict:
    raw = await request.body()

    def no_constants(c):
        raise ValueError(f"{c} is not valid JSON")
    try:
        body = json.loads(raw, parse_constant=no_constants)
    except (ValueError, RecursionError):
        raise APIError(400, "We could not parse the JSON body of your request.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_type")
    return body


def create_app(backend, *, api_key: str | None = None, store: Store | None = None,
               limits: Limits | None = None) -> FastAPI:
    """The server around ``backend`` (see ``Backend``); ``store`` keeps the web page's history."""
    import gptlab.generate.engine  # noqa: F401  (imports torch: pay that at startup, not on a request)
    limits = limits or Limits()
    store = store if store is not None else Store(":memory:")   # history lasts while the server runs
    app = FastAPI(title="gptlab", version="1", description="OpenAI-compatible API and chat page for a gptlab model.")
    app.state.backend, app.state.store, app.state.limits = backend, store, limits
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=limits.max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(GptlabError)
    async def _gptlab_error(request, exc: GptlabError):
        return error_response(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        errs = exc.errors()
        loc = ".".join(str(x) for x in errs[0].get("loc", ())[1:]) if errs else None
        msg = errs[0].get("msg", "invalid request") if errs else "invalid request"
        return error_response(400, f"{loc}: {msg}" if loc else msg, param=loc or None, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(exc.status_code, str(exc.detail), code=codes.get(exc.status_code),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        # A bug or a failing disk, never the caller's input (that is validated above): still JSON.
        return error_response(500, f"internal error: {type(exc).__name__}", type="server_error")

    _register_v1(app, backend, limits)
    _register_web(app, backend, store, limits)
    _register_static(app, backend, limits, api_key)
    return app


# ----- /v1: the OpenAI-compatible API ----------------------------------------------------------------
def _body_schema(props: dict, required: list[str]) -> dict:
    """Request-body documentation for /openapi.json (validation itself is done by hand, above)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": required, "properties": props}}}}}


_SAMPLING_DOC = {
    "model": {"type": "string"}, "n": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": 1, "description": "gptlab extension"},
    "max_tokens": {"type": "integer"}, "max_completion_tokens": {"type": "integer"},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
    "seed": {"type": "integer"}, "stream": {"type": "boolean"},
    "ignore_eos": {"type": "boolean", "description": "gptlab extension: do not stop at end of text/turn"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
}
_CHAT_DOC = _body_schema({**_SAMPLING_DOC, "messages": {"type": "array", "items": {
    "type": "object", "required": ["role", "content"], "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant"]}, "content": {"type": "string"}}}}},
    ["model", "messages"])
_COMPLETIONS_DOC = _body_schema({**_SAMPLING_DOC, "echo": {"type": "boolean"}, "prompt": {"oneOf": [
    {"type": "string"}, {"type": "array", "items": {"type": "string"}},
    {"type": "array", "items": {"type": "integer"}}]}}, ["model", "prompt"])


def _finish(reason: str | None) -> str:
    return reason if reason in ("stop", "length") else "stop"


def _submit(backend, prompts: list[list[int]], s: Sampling) -> list:
    """n requests per prompt; choice index = prompt * n + j."""
    try:
        return [backend.submit(p, s.params(j)) for p in prompts for j in range(s.n)]
    except RuntimeError as e:   # the scheduler is closed: the server is shutting down
        raise APIError(503, f"server unavailable ({e})", type="server_error") from None


async def _run(backend, prompts, s: Sampling, request: Request) -> tuple[list[str], list[str], int]:
    """Generate every choice to the end: (texts, finish reasons, completion tokens)."""
    reqs = _submit(backend, prompts, s)
    texts, reasons = [""] * len(reqs), ["stop"] * len(reqs)
    async for i, ev in drain(reqs, request):
        texts[i] += ev.text
        if ev.finish_reason == "error":
            raise APIError(500, "generation failed inside the engine", type="server_error")
        if ev.finish_reason:
            reasons[i] = _finish(ev.finish_reason)
    used = sum([await completion_tokens(r, t, backend.tok) for r, t in zip(reqs, texts)])
    return texts, reasons, used


def _usage(prompt_tokens: int, completion: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


async def _stream(backend, prompts, s: Sampling, request: Request, chunk, prompt_tokens: int,
                  prefix: list[str] | None = None):
    """SSE body shared by both endpoints; ``chunk(index, text, finish, first)`` shapes one event."""
    reqs, texts = [], []
    try:
        reqs = _submit(backend, prompts, s)
        texts = [""] * len(reqs)
        for i in range(len(reqs)):
            yield sse(chunk(i, prefix[i // s.n] if prefix else "", None, True))
        async for i, ev in drain(reqs, request):
            if ev.finish_reason == "error":
                yield sse({"error": {"message": "generation failed inside the engine", "type": "server_error",
                                     "param": None, "code": None}})
                return
            texts[i] += ev.text
            if ev.text:
                yield sse(chunk(i, ev.text, None, False))
            if ev.finish_reason:
                yield sse(chunk(i, "", _finish(ev.finish_reason), False))
        if s.include_usage:
            used = sum([await completion_tokens(r, t, backend.tok) for r, t in zip(reqs, texts)])
            final = chunk(0, "", None, False)
            final.update(choices=[], usage=_usage(prompt_tokens, used))
            yield sse(final)
        yield b"data: [DONE]\n\n"
    except ClientGone:
        return
    except APIError as e:
        yield sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
    finally:
        for r in reqs:
            r.cancel()


def _register_v1(app: FastAPI, backend, limits: Limits) -> None:
    def card() -> dict:
        return {"id": backend.model_id, "object": "model", "created": getattr(backend, "created", 0),
                "owned_by": "gptlab"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id != backend.model_id:
            raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return card()

    @app.post("/v1/chat/completions", openapi_extra=_CHAT_DOC)
    async def chat_completions(request: Request):
        body = await read_json(request)
        model = check_model(body, backend)
        if "messages" not in body:
            raise bad("you must provide a 'messages' parameter", "messages", "missing_required_parameter")
        messages = parse_messages(body["messages"], limits)
        s = parse_sampling(body, limits)
        ids, dropped = fit_chat(backend, messages, s.max_tokens)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        headers = {"x-gptlab-truncated-turns": str(dropped)}
        if s.stream:
            def chunk(i, text, finish, first):
                delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "system_fingerprint": None,
                     "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]}
                if s.include_usage:
                    c["usage"] = None
                return c
            return StreamingResponse(_stream(backend, [ids], s, request, chunk, len(ids)),
                                     media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
        try:
            texts, reasons, used = await _run(backend, [ids], s, request)
        except ClientGone:
            return Response(status_code=499)
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": i, "message": {"role": "assistant", "content": t, "refusal": None},
                         "logprobs": None, "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))],
            "usage": _usage(len(ids), used)}, headers=headers)

    @app.post("/v1/completions", openapi_extra=_COMPLETIONS_DOC)
    async def completions(request: Request):
        body = await read_json(request)
        model = check_model(body, backend)
        s = parse_sampling(body, limits, min_tokens=0)
        prompts, texts = _parse_prompts(body, backend, limits)
        if len(prompts) * s.n > limits.max_n * limits.max_prompts:
            raise bad("too many choices requested (prompts x n)", "n")
        if body.get("suffix") not in (None, ""):
            raise bad("'suffix' is not supported by this server", "suffix")
        echo = _bool(body, "echo")
        prefix = texts if echo else None
        prompt_tokens = sum(len(p) for p in prompts)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if s.stream:
            def chunk(i, text, finish, first):
                c = {"id": cid, "object": "text_completion", "created": created, "model": model,
                     "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}]}
                if s.include_usage:
                    c["usage"] = None
                return c
            return StreamingResponse(_stream(backend, prompts, s, request, chunk, prompt_tokens, prefix),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            outs, reasons, used = await _run(backend, prompts, s, request)
        except ClientGone:
            return Response(status_code=499)
        return JSONResponse({
            "id": cid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": i, "text": (prefix[i // s.n] if prefix else "") + t, "logprobs": None,
                         "finish_reason": r} for i, (t, r) in enumerate(zip(outs, reasons))],
            "usage": _usage(prompt_tokens, used)})


def _parse_prompts(body: dict, backend, limits: Limits) -> tuple[list[list[int]], list[str]]:
    """Legacy ``prompt``: a string, a list of strings, a list of token ids or a list of such lists."""
    if "prompt" not in body:
        raise bad("you must provide a 'prompt' parameter", "prompt", "missing_required_parameter")
    p = body["prompt"]
    tok, vocab = backend.tok, backend.tok.vocab_size
    if isinstance(p, str):
        items = [p]
    elif isinstance(p, list) and p and all(_is_int(x) for x in p):
        items = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        items = p
    elif isinstance(p, list) and p and all(isinstance(x, list) and all(_is_int(y) for y in x) for x in p):
        items = p
    else:
        raise bad("'prompt' must be a string, a list of strings, or token ids", "prompt", "invalid_type")
    if len(items) > limits.max_prompts:
        raise bad(f"at most {limits.max_prompts} prompts per request", "prompt")
    ids_list, texts = [], []
    for item in items:
        if isinstance(item, str):
            ids, text = tok.encode(item), item
        else:
            if any(not 0 <= t < vocab for t in item):
                raise bad(f"token ids must be in [0, {vocab})", "prompt")
            ids, text = list(item), tok.decode(item)
        if len(ids) >= backend.context_size:
            raise bad(f"This model's maximum context length is {backend.context_size} tokens; the prompt has "
                      f"{len(ids)}", "prompt", "context_length_exceeded")
        ids_list.append(ids)
        texts.append(text)
    return ids_list, texts


# ----- /api: the web page's endpoints ------------------------------------------------------------------
def _web_sampling(body: dict, limits: Limits) -> Sampling:
    s = parse_sampling({k: body.get(k) for k in ("temperature", "top_p", "max_tokens", "seed")}, limits)
    s.stream = True
    return s


def _content(body: dict) -> str:
    content = body.get("content")
    if not isinstance(content, str) or not content.strip():
        raise bad("'content' must be a non-empty string", "content")
    return content


def _register_web(app: FastAPI, backend, store: Store, limits: Limits) -> None:
    def conversation(cid: int) -> dict:
        conv = store.get_conversation(cid)
        if conv is None:
            raise APIError(404, f"no conversation {cid}", code="not_found")
        return conv

    def message(mid: int) -> dict:
        msg = store.get_message(mid)
        if msg is None:
            raise APIError(404, f"no message {mid}", code="not_found")
        return msg

    def leaf(cid: int) -> int | None:
        thread = store.thread(cid)
        return thread[-1]["id"] if thread else None

    def prepare(cid: int, upto: int | None, s: Sampling, new_user: str | None = None) -> tuple[list[int], int]:
        """Prompt ids for the path to ``upto`` (plus a user message not stored yet): fit before storing,
        so a message that can never fit is refused without leaving a dangling turn behind."""
        messages = store.chat_messages(cid, upto)
        if new_user is not None:
            messages.append({"role": "user", "content": new_user})
        return fit_chat(backend, messages, s.max_tokens)

    async def reply_stream(request: Request, cid: int, parent_id: int, ids: list[int], dropped: int,
                           s: Sampling, start: dict, regenerated_from: int | None = None):
        """Stream one answer; store it when it ends, also when the user stops it (the fetch is aborted)."""
        req, text, finish, saved = None, "", None, None
        try:
            yield sse({"type": "start", "truncated_turns": dropped, **start})
            req = _submit(backend, [ids], s)[0]
            async for _, ev in drain([req], request):
                text += ev.text
                finish = ev.finish_reason or finish
                if ev.text:
                    yield sse({"type": "delta", "text": ev.text})
        except ClientGone:
            pass
        finally:
            if req is not None:
                req.cancel()
            try:
                saved = store.add_message(cid, "assistant", text, parent_id=parent_id, model=backend.model_id,
                                          finish_reason=_finish(finish) if finish else "stopped",
                                          regenerated_from=regenerated_from)
            except GptlabError:   # the conversation was deleted meanwhile
                saved = None
        if finish == "error":
            yield sse({"type": "error", "message": "generation failed inside the engine"})
        yield sse({"type": "done", "message": saved})

    def sse_response(gen) -> StreamingResponse:
        return StreamingResponse(gen, media_type="text/event-stream", headers=SSE_HEADERS)

    @app.get("/api/conversations")
    async def list_conversations():
        return {"data": store.list_conversations()}

    @app.post("/api/conversations")
    async def create_conversation(request: Request):
        body = await read_json(request)
        title, system = body.get("title", ""), body.get("system_prompt", "")
        if not isinstance(title, str) or not isinstance(system, str):
            raise bad("'title' and 'system_prompt' must be strings")
        return store.create_conversation(title, system)

    @app.patch("/api/conversations/{cid}")
    async def update_conversation(cid: int, request: Request):
        conversation(cid)
        body = await read_json(request)
        title, system = body.get("title"), body.get("system_prompt")
        if any(v is not None and not isinstance(v, str) for v in (title, system)):
            raise bad("'title' and 'system_prompt' must be strings")
        return store.update_conversation(cid, title, system)

    @app.delete("/api/conversations/{cid}")
    async def delete_conversation(cid: int):
        if not store.delete_conversation(cid):
            raise APIError(404, f"no conversation {cid}", code="not_found")
        return {"deleted": True, "id": cid}

    @app.get("/api/conversations/{cid}")
    async def get_conversation(cid: int):
        conv = conversation(cid)
        thread = store.thread(cid)
        everything = store.messages(cid)
        for m in thread:   # how many versions (regenerations) each answer has, for "2 / 3" labels
            sibs = [x["id"] for x in everything if x["role"] == m["role"] and x["parent_id"] == m["parent_id"]]
            m["versions"], m["version"] = len(sibs), sibs.index(m["id"]) + 1
        pending = None
        if thread and thread[-1]["role"] == "user":
            open_ = [c for c in store.comparisons(cid) if c["message_id"] == thread[-1]["id"] and not c["choice"]]
            pending = open_[-1] if open_ else None
        return {"conversation": conv, "messages": thread, "pending_comparison": pending}

    @app.post("/api/conversations/{cid}/messages")
    async def post_message(cid: int, request: Request):
        conversation(cid)
        body = await read_json(request)
        content, s = _content(body), _web_sampling(body, limits)
        parent = leaf(cid)
        ids, dropped = prepare(cid, parent, s, content)
        user = store.add_message(cid, "user", content, parent_id=parent)
        return sse_response(reply_stream(request, cid, user["id"], ids, dropped, s, {"user_message": user}))

    @app.post("/api/messages/{mid}/regenerate")
    async def regenerate(mid: int, request: Request):
        old = message(mid)
        if old["role"] != "assistant" or old["parent_id"] is None:
            raise bad("only an assistant answer can be regenerated")
        body = await read_json(request)
        s = _web_sampling(body, limits)
        ids, dropped = prepare(old["conversation_id"], old["parent_id"], s)
        return sse_response(reply_stream(request, old["conversation_id"], old["parent_id"], ids, dropped, s,
                                         {"regenerated_from": mid}, regenerated_from=mid))

    @app.post("/api/messages/{mid}/feedback")
    async def feedback(mid: int, request: Request):
        message(mid)
        body = await read_json(request)
        rating = body.get("rating")
        if not _is_int(rating) or rating not in (-1, 0, 1):
            raise bad("'rating' must be 1 (thumbs up), -1 (thumbs down) or 0 (clear)", "rating")
        return {"message_id": mid, "rating": rating, "feedback": store.set_feedback(mid, rating)}

    @app.post("/api/conversations/{cid}/compare")
    async def compare(cid: int, request: Request):
        """Two answers to one new user message, streamed side by side; the user then picks one."""
        conversation(cid)
        body = await read_json(request)
        content, s = _content(body), _web_sampling(body, limits)
        if s.temperature == 0:
            s.temperature = 1.0   # two greedy answers would be identical: nothing to compare
        s.n, s.seed = 2, None
        parent = leaf(cid)
        ids, dropped = prepare(cid, parent, s, content)
        user = store.add_message(cid, "user", content, parent_id=parent)
        prompt = store.chat_messages(cid, user["id"])

        async def gen():
            reqs, texts, saved = [], ["", ""], None
            try:
                yield sse({"type": "start", "user_message": user, "truncated_turns": dropped,
                           "temperature": s.temperature})
                reqs = _submit(backend, [ids], s)
                async for i, ev in drain(reqs, request):
                    texts[i] += ev.text
                    if ev.text:
                        yield sse({"type": "delta", "side": "ab"[i], "text": ev.text})
            except ClientGone:
                pass
            finally:
                for r in reqs:
                    r.cancel()
                saved = store.add_comparison(cid, prompt, texts[0], texts[1], message_id=user["id"],
                                             model=backend.model_id) if store.get_conversation(cid) else None
            yield sse({"type": "done", "comparison": saved})
        return sse_response(gen())

    @app.post("/api/comparisons/{kid}/choice")
    async def choose(kid: int, request: Request):
        body = await read_json(request)
        choice = body.get("choice")
        if choice not in ("a", "b", "tie"):
            raise bad("'choice' must be 'a', 'b' or 'tie'", "choice")
        if store.get_comparison(kid) is None:
            raise APIError(404, f"no comparison {kid}", code="not_found")
        comp = store.set_comparison_choice(kid, choice)
        msg = None
        # The preferred answer (a on a tie) continues the conversation, unless it already moved on.
        cid, uid = comp["conversation_id"], comp["message_id"]
        if cid is not None and uid is not None and leaf(cid) == uid:
            text = comp["answer_b"] if choice == "b" else comp["answer_a"]
            msg = store.add_message(cid, "assistant", text, parent_id=uid, model=comp["model"],
                                    finish_reason="stop")
        return {"comparison": comp, "message": msg}


def _register_static(app: FastAPI, backend, limits: Limits, api_key: str | None) -> None:
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": backend.model_id, "context_size": backend.context_size,
                "max_batch": getattr(backend, "max_batch", None), "busy_slots": backend.busy_slots,
                "auth_required": bool(api_key), "max_tokens_limit": limits.max_tokens_limit,
                "chat": has_chat_template(backend.tok)}

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
