"""The wire protocol shared by every route: OpenAI-shaped errors, limits and hand-written validation.

Requests are validated by hand (not by pydantic) so that each mistake gets OpenAI's error shape, a
precise ``param`` and a 4xx status: bad input never yields a 500.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass

from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

# SQLite's INTEGER is signed 64-bit: larger path ids cannot name a row (and would overflow the driver).
MAX_ID = (1 << 63) - 1


@dataclass
class Limits:
    """What one request may ask for (protects a shared model from a single greedy client)."""
    max_body_bytes: int = 4 << 20
    max_messages: int = 512
    max_tokens_limit: int = 2048      # largest max_tokens a request may ask for
    default_max_tokens: int = 512     # when a request does not say
    max_n: int = 8                    # choices per request
    max_prompts: int = 16             # legacy completions: prompts per request
    max_images: int = 8               # pictures per request (each costs an encoder pass and context)


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


def not_found(what: str, id_: int) -> APIError:
    return APIError(404, f"no {what} {id_}", code="not_found")


def row_id(what: str, id_: int) -> int:
    """A path id that can name a stored row; any other integer is simply not there (404)."""
    if not 1 <= id_ <= MAX_ID:
        raise not_found(what, id_)
    return id_


# ----- the JSON body ---------------------------------------------------------------------------------
# JSON may spell a UTF-16 surrogate half as an escape; Python then holds a str that cannot be encoded
# (the tokenizer and SQLite both fail on it). Only a body containing such an escape is walked.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_PARSE_IN_THREAD = 64 << 10   # bigger bodies are parsed off the event loop
# json.loads holds the GIL for the whole parse (~60 ns a value), so even in a worker thread a body of two
# million tiny values held every other request, /health included, for ~130 ms. A body with more values
# than this (far above any real request: 16 prompts of 16k token ids) is refused before it is parsed.
MAX_JSON_VALUES = 1 << 18
_STRUCTURE = b",[{"
_SCAN_CHUNK = 64 << 10


def _values_outside_strings(raw: bytes, stop_after: int) -> int:
    """Commas and opening brackets outside JSON strings (about the number of values), counted in
    chunks so the GIL is free between them. Escapes pair from the left, so once ``\\`` and ``\"`` are
    blanked out every remaining quote opens or closes a string."""
    plain = raw.replace(b"\\\\", b"  ").replace(b'\\"', b"  ")
    count, inside = 0, False
    for at in range(0, len(plain), _SCAN_CHUNK):
        parts = plain[at:at + _SCAN_CHUNK].split(b'"')
        outside = b"".join(parts[1 if inside else 0::2])
        count += len(outside) - len(outside.translate(None, _STRUCTURE))
        inside ^= len(parts) % 2 == 0   # an odd number of quotes in this chunk
        if count > stop_after:
            break
    return count


def _no_constants(c):
    raise ValueError(f"{c} is not valid JSON")


def _parse(raw: bytes):
    # The quick count (brackets and commas in strings too) decides whether the exact one is needed.
    if len(raw) - len(raw.translate(None, _STRUCTURE)) > MAX_JSON_VALUES \
            and _values_outside_strings(raw, MAX_JSON_VALUES) > MAX_JSON_VALUES:
        raise APIError(400, f"The request body holds more than {MAX_JSON_VALUES} JSON values.",
                       code="too_many_values")
    body = json.loads(raw, parse_constant=_no_constants)
    if _SURROGATE_ESCAPE.search(raw):
        _refuse_lone_surrogates(body)
    return body


def _refuse_lone_surrogates(body) -> None:
    stack = [body]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if _LONE_SURROGATE.search(v):
                raise APIError(400, "The request body holds a lone UTF-16 surrogate (e.g. \\ud800), which is "
                               "not a Unicode character.", code="invalid_value")
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


async def read_json(request: Request) -> dict:
    raw = await request.body()
    try:
        body = await run_in_threadpool(_parse, raw) if len(raw) > _PARSE_IN_THREAD else _parse(raw)
    except (ValueError, RecursionError):
        raise APIError(400, "We could not parse the JSON body of your request.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_type")
    return body


# JSON leaves these raw in strings, yet many clients split SSE lines with str.splitlines (httpx's
# iter_lines among them), which also breaks at them: an answer holding one arrived as two broken events.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(obj) -> bytes:
    """One server-sent event: a single line of JSON, whatever the text in it."""
    return f"data: {json.dumps(obj, ensure_ascii=False).translate(_LINE_BREAKS)}\n\n".encode()


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ----- fields ----------------------------------------------------------------------------------------
def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not (is_int(v) or isinstance(v, float)) or not math.isfinite(v):
        raise bad(f"'{name}' must be a number", name, "invalid_type")
    if v < lo or v > hi or (lo_open and v == lo):
        rng = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise bad(f"'{name}' must be in {rng}, got {v}", name)
    return float(v)


def _integer(body: dict, name: str, default, lo: int, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if not is_int(v):
        raise bad(f"'{name}' must be an integer", name, "invalid_type")
    if v < lo or (hi is not None and v > hi):
        raise bad(f"'{name}' must be between {lo} and {hi}, got {v}" if hi is not None
                  else f"'{name}' must be >= {lo}, got {v}", name)
    return v


def boolean(body: dict, name: str, default: bool = False) -> bool:
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
    stream = boolean(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = boolean(opts or {}, "include_usage")
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
        ignore_eos=boolean(body, "ignore_eos"))


def _tool_calls(raw, where: str, ids: set[str]) -> list[dict]:
    """An assistant message's OpenAI ``tool_calls`` -> [{name, arguments}]; their ids join ``ids``."""
    if not isinstance(raw, list) or not raw:
        raise bad(f"{where}.tool_calls must be a non-empty list", f"{where}.tool_calls", "invalid_type")
    out = []
    for j, c in enumerate(raw):
        w = f"{where}.tool_calls[{j}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(c.get("id"), str) or c.get("type", "function") != "function":
            raise bad(f"{w} must be {{'id': str, 'type': 'function', 'function': {{'name', 'arguments'}}}}", w)
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(f"{w}.function.name must be a string", f"{w}.function.name")
        try:
            args = json.loads(fn.get("arguments") or "{}") if isinstance(fn.get("arguments", ""), str) else None
        except ValueError:
            args = None
        if not isinstance(args, dict):
            raise bad(f"{w}.function.arguments must be a JSON object in a string", f"{w}.function.arguments")
        ids.add(c["id"])
        out.append({"name": fn["name"], "arguments": args})
    return out


def parse_messages(raw, limits: Limits) -> list[dict]:
    """OpenAI messages -> gptlab's [{role, content}] (leading system/developer turns merged into one).

    Function calling: an assistant message's ``tool_calls`` become gptlab's ``[{name, arguments}]``; a
    ``tool`` message must answer one of them by its ``tool_call_id``.
    """
    if not isinstance(raw, list):
        raise bad("'messages' must be a list", "messages", "invalid_type")
    if not raw:
        raise bad("'messages' must not be empty", "messages")
    if len(raw) > limits.max_messages:
        raise bad(f"'messages' holds {len(raw)} messages; the limit is {limits.max_messages}", "messages")
    out: list[dict] = []
    call_ids: set[str] = set()
    images = 0
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object with 'role' and 'content'", where, "invalid_type")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise bad(f"{where}.role {role!r} is not supported (system, developer, user, assistant, tool)",
                      f"{where}.role")
        content = m.get("content")
        if content is None and role == "assistant" and m.get("tool_calls"):
            content = ""   # a message that only calls tools
        if isinstance(content, list):   # content parts: text, and pictures in a user turn
            content = parse_parts(content, where, role)
            images += sum(1 for p in content if p["type"] == "image")
            if images > limits.max_images:
                raise bad(f"at most {limits.max_images} images per request", f"{where}.content")
            if all(p["type"] == "text" for p in content):
                content = "".join(p["text"] for p in content)
        if not isinstance(content, (str, list)):
            raise bad(f"{where}.content must be a string", f"{where}.content", "invalid_type")
        if role == "system":
            if out and out[-1]["role"] != "system":
                raise bad(f"{where}: system messages may only come first", f"{where}.role")
            if out:
                out[-1]["content"] += "\n\n" + content
                continue
        msg = {"role": role, "content": content}
        if role == "assistant" and m.get("tool_calls") is not None:
            msg["tool_calls"] = _tool_calls(m["tool_calls"], where, call_ids)
        if role == "tool":
            tid = m.get("tool_call_id")
            if not isinstance(tid, str):
                raise bad(f"{where}.tool_call_id is required for a tool message", f"{where}.tool_call_id",
                          "missing_required_parameter")
            if tid not in call_ids:
                raise bad(f"{where}.tool_call_id {tid!r} answers no earlier assistant tool call",
                          f"{where}.tool_call_id")
        out.append(msg)
    if all(m["role"] == "system" for m in out):
        raise bad("'messages' needs at least one user or assistant message", "messages")
    return out


_DATA_URL = re.compile(r"data:(image/[a-z0-9.+-]+)?(;[^,]*)?,", re.I)


def parse_parts(content: list, where: str, role: str) -> list[dict]:
    """OpenAI content parts -> [{"type": "text", "text"}, {"type": "image", "data": bytes, "where"}].

    A picture must travel inside the request as a base64 ``data:`` URL: the server never fetches a URL
    or opens a path a client names (that would let any client make it read its files or reach hosts
    on its network). The bytes are decoded into pixels later, off the event loop."""
    out = []
    for j, part in enumerate(content):
        w = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append({"type": "text", "text": part["text"]})
            continue
        if kind != "image_url":
            raise bad(f"{w}: only text and image_url parts are supported", w)
        if role != "user":
            raise bad(f"{w}: only a user message may hold an image", w)
        ref = part.get("image_url")
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not isinstance(url, str):
            raise bad(f"{w}.image_url.url must be a string", f"{w}.image_url", "invalid_type")
        m = _DATA_URL.match(url[:200])
        if not m:
            raise bad(f"{w}: images must be sent as data: URLs (data:image/png;base64,...); this server fetches "
                      "no URLs and reads no files", f"{w}.image_url", "invalid_image_url")
        if not m.group(2) or "base64" not in m.group(2).lower():
            raise bad(f"{w}: the data: URL must be base64-encoded (data:image/png;base64,...)", f"{w}.image_url",
                      "invalid_image_url")
        try:
            data = base64.b64decode(url[m.end():], validate=True)
        except (binascii.Error, ValueError):
            raise bad(f"{w}: the image is not valid base64", f"{w}.image_url", "invalid_image_url") from None
        out.append({"type": "image", "data": data, "where": w})
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
