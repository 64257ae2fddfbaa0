"""``/v1``: the OpenAI-compatible API (chat completions, legacy completions, models), streaming included,
so the official ``openai`` client and anything built on it work against a gptlab model."""
from __future__ import annotations

import time
import uuid

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from gptlab.serve import functions
from gptlab.tokenizer.chat_template import max_token_chars
from gptlab.serve.backend import ClientGone, completion_tokens, drain, finish_reason, fit_chat, submit
from gptlab.serve.protocol import (SSE_HEADERS, APIError, Limits, Sampling, bad, boolean, check_model, is_int,
                                   parse_messages, parse_sampling, read_json, sse)


def _body_schema(props: dict, required: list[str]) -> dict:
    """Request-body documentation for /openapi.json (validation itself is done by hand)."""
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
CHAT_DOC = _body_schema({**_SAMPLING_DOC, "messages": {"type": "array", "items": {
    "type": "object", "required": ["role", "content"], "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant", "tool"]}, "content": {"type": "string"},
        "tool_calls": {"type": "array"}, "tool_call_id": {"type": "string"}}}},
    "tools": {"type": "array", "items": {"type": "object", "properties": {
        "type": {"enum": ["function"]}, "function": {"type": "object", "required": ["name"]}}}},
    "tool_choice": {"oneOf": [{"enum": ["none", "auto", "required"]}, {"type": "object"}]}},
    ["model", "messages"])
COMPLETIONS_DOC = _body_schema({**_SAMPLING_DOC, "echo": {"type": "boolean"}, "prompt": {"oneOf": [
    {"type": "string"}, {"type": "array", "items": {"type": "string"}},
    {"type": "array", "items": {"type": "integer"}}]}}, ["model", "prompt"])


async def _run(backend, prompts, s: Sampling, request: Request, images=None) -> tuple[list[str], list[str], int]:
    """Generate every choice to the end: (texts, finish reasons, completion tokens)."""
    reqs = submit(backend, prompts, s, images)
    texts, reasons = [""] * len(reqs), ["stop"] * len(reqs)
    async for i, ev in drain(reqs, request):
        texts[i] += ev.text
        if ev.finish_reason == "error":
            raise APIError(500, "generation failed inside the engine", type="server_error")
        if ev.finish_reason:
            reasons[i] = finish_reason(ev.finish_reason)
    used = sum([await completion_tokens(r, t, backend.tok) for r, t in zip(reqs, texts)])
    return texts, reasons, used


def _usage(prompt_tokens: int, completion: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


async def _stream(backend, prompts, s: Sampling, request: Request, chunk, prompt_tokens: int,
                  prefix: list[str] | None = None, images=None):
    """SSE body shared by both endpoints; ``chunk(index, text, finish, first)`` shapes one event."""
    reqs, texts = [], []
    try:
        reqs = submit(backend, prompts, s, images)
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
                yield sse(chunk(i, "", finish_reason(ev.finish_reason), False))
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


async def _chat_with_tools(backend, body: dict, messages: list[dict], s: Sampling, model: str, request: Request):
    """A chat completion whose model may call tools (the request's functions, the server's own)."""
    turn = functions.make_turn(backend, messages, body, s)
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    counts: dict = {}   # filled by functions.drive as the turn runs

    def usage() -> dict:
        return _usage(counts.get("prompt_tokens", 0), counts.get("completion_tokens", 0))
    if s.stream:
        def chunk(delta, finish):
            c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                 "system_fingerprint": None,
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if s.include_usage:
                c["usage"] = None
            return c

        async def events():
            try:
                async for c in functions.stream(backend, turn, s, request, chunk, counts):
                    yield sse(c)
                if s.include_usage:
                    yield sse({**chunk({}, None), "choices": [], "usage": usage()})
                yield b"data: [DONE]\n\n"
            except ClientGone:
                return
            except APIError as e:
                yield sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        choice = await functions.complete(backend, turn, s, request, counts)
    except ClientGone:
        return Response(status_code=499)
    return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": model,
                         "system_fingerprint": None, "choices": [choice], "usage": usage()},
                        headers={"x-gptlab-truncated-turns": str(turn.dropped)})


def parse_prompts(body: dict, backend, limits: Limits) -> tuple[list[list[int]], list[str]]:
    """Legacy ``prompt``: a string, a list of strings, a list of token ids or a list of such lists.

    Blocking (tokenises): call it off the event loop. A text longer than the context could hold is
    refused by its length alone, before any tokenising.
    """
    if "prompt" not in body:
        raise bad("you must provide a 'prompt' parameter", "prompt", "missing_required_parameter")
    p = body["prompt"]
    tok, vocab, ctx = backend.tok, backend.tok.vocab_size, backend.context_size
    if isinstance(p, str):
        items = [p]
    elif isinstance(p, list) and p and all(is_int(x) for x in p):
        items = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        items = p
    elif isinstance(p, list) and p and all(isinstance(x, list) and all(is_int(y) for y in x) for x in p):
        items = p
    else:
        raise bad("'prompt' must be a string, a list of strings, or token ids", "prompt", "invalid_type")
    if len(items) > limits.max_prompts:
        raise bad(f"at most {limits.max_prompts} prompts per request", "prompt")

    def too_long(n: str) -> APIError:
        return bad(f"This model's maximum context length is {ctx} tokens; the prompt has {n}", "prompt",
                   "context_length_exceeded")
    widest = max_token_chars(tok)
    ids_list, texts = [], []
    for item in items:
        if len(item) >= (ctx * widest if isinstance(item, str) else ctx):   # too long whatever the text
            raise too_long(f"more than {ctx}" if isinstance(item, str) else str(len(item)))
        if isinstance(item, str):
            ids, text = tok.encode(item), item
        else:
            if any(not 0 <= t < vocab for t in item):
                raise bad(f"token ids must be in [0, {vocab})", "prompt")
            ids, text = list(item), tok.decode(item)
        if len(ids) >= ctx:
            raise too_long(str(len(ids)))
        ids_list.append(ids)
        texts.append(text)
    return ids_list, texts


def router(backend, limits: Limits) -> APIRouter:
    api = APIRouter(prefix="/v1")

    def card() -> dict:
        return {"id": backend.model_id, "object": "model", "created": getattr(backend, "created", 0),
                "owned_by": "gptlab"}

    @api.get("/models")
    async def list_models():
        return {"object": "list", "data": [card()]}

    @api.get("/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id != backend.model_id:
            raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return card()

    @api.post("/chat/completions", openapi_extra=CHAT_DOC)
    async def chat_completions(request: Request):
        body = await read_json(request)
        model = check_model(body, backend)
        if "messages" not in body:
            raise bad("you must provide a 'messages' parameter", "messages", "missing_required_parameter")
        messages = parse_messages(body["messages"], limits)
        s = parse_sampling(body, limits)
        if functions.uses_tools(body, backend) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            if any(isinstance(m["content"], list) for m in messages):
                raise bad("images and tools in one request are not supported", "messages")
            return await _chat_with_tools(backend, body, messages, s, model, request)
        ids, dropped, images = await fit_chat(backend, messages, s.max_tokens)
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
            return StreamingResponse(_stream(backend, [ids], s, request, chunk, len(ids), images=images),
                                     media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
        try:
            texts, reasons, used = await _run(backend, [ids], s, request, images)
        except ClientGone:
            return Response(status_code=499)
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": i, "message": {"role": "assistant", "content": t, "refusal": None},
                         "logprobs": None, "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))],
            "usage": _usage(len(ids), used)}, headers=headers)

    @api.post("/completions", openapi_extra=COMPLETIONS_DOC)
    async def completions(request: Request):
        body = await read_json(request)
        model = check_model(body, backend)
        s = parse_sampling(body, limits, min_tokens=0)
        prompts, texts = await run_in_threadpool(parse_prompts, body, backend, limits)
        if len(prompts) * s.n > limits.max_n * limits.max_prompts:
            raise bad("too many choices requested (prompts x n)", "n")
        if body.get("suffix") not in (None, ""):
            raise bad("'suffix' is not supported by this server", "suffix")
        echo = boolean(body, "echo")
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

    return api
