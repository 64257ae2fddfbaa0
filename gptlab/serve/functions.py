"""OpenAI function calling on ``/v1/chat/completions``, and the server's own tools.

A request's ``tools`` (``[{"type": "function", "function": {name, description, parameters}}]``) are shown
to the model in the system turn; ``tool_choice`` is ``"auto"`` (the model decides), ``"none"`` (no tool
is shown, none can be called), ``"required"`` (the reply opens with a call) or
``{"type": "function", "function": {"name": N}}`` (a call to N, its name already written). A call of a
client's function ends the reply with ``message.tool_calls`` and ``finish_reason: "tool_calls"``; the
client runs it and sends the result back as a ``tool`` message with its ``tool_call_id``.

Tools the server was started with (``gptlab serve --tools calculator,search``) run here, inside the
same reply, through the engine's ``ToolTurn``; what they were asked and answered is returned beside the
message as ``tool_runs`` (a gptlab extension; OpenAI clients ignore it).
"""
from __future__ import annotations

import json
import uuid
from dataclasses import replace

from starlette.concurrency import run_in_threadpool

from gptlab.errors import GptlabError
from gptlab.generate.tool_loop import ToolTurn
from gptlab.serve.backend import drain, finish_reason
from gptlab.serve.protocol import APIError, Sampling, bad
from gptlab.tools import check_spec


def parse_tools(body: dict, builtin: list[dict]) -> tuple[list[dict] | None, str | bool | None]:
    """(function definitions the model is shown, what is forced: None, True or a name)."""
    raw = body.get("tools")
    functions: list[dict] = []
    if raw is not None:
        if not isinstance(raw, list):
            raise bad("'tools' must be a list", "tools", "invalid_type")
        for i, t in enumerate(raw):
            if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
                raise bad(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", f"tools[{i}]")
            try:
                functions.append(check_spec(t["function"], f"tools[{i}].function"))
            except GptlabError as e:
                raise bad(f"Invalid schema for function: {e}", f"tools[{i}].function") from None
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise bad("tools: function names must be unique", "tools")
    taken = {b["name"] for b in builtin} & set(names)
    if taken:
        raise bad(f"tools: {sorted(taken)[0]!r} is a tool this server runs itself; rename yours", "tools")
    shown = builtin + functions
    choice = body.get("tool_choice", "auto" if shown else "none")
    if choice == "none":
        return None, None
    if not shown:
        raise bad("'tool_choice' is only allowed when 'tools' are given", "tool_choice")
    if choice == "auto":
        return shown, None
    if choice == "required":
        return shown, True
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                  "{'name': ...}}", "tool_choice")
    if fn["name"] not in {t["name"] for t in shown}:
        raise bad(f"tool_choice names {fn['name']!r}, which is not in 'tools'", "tool_choice")
    return shown, fn["name"]


def uses_tools(body: dict, backend) -> bool:
    return bool(body.get("tools") or body.get("tool_choice") not in (None, "none") or getattr(backend, "toolbox", None))


def openai_call(call, cid: str | None = None) -> dict:
    return {"id": cid or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}


def _runs(turn: ToolTurn) -> list[dict]:
    return [{"name": c.name, "arguments": c.arguments, "result": c.result} for c in turn.calls if c.result is not None]


async def drive(backend, turn: ToolTurn, s: Sampling, request, usage: dict | None = None):
    """Run one tool turn on the scheduler: yield ("text", delta) of the reply and ("call", ToolCall) as
    each server-side tool runs or a client call is made. ``usage`` gets the token counts as they are
    known (the first prompt's length, every generated id), so nothing is re-encoded to report them."""
    usage = {} if usage is None else usage
    usage.setdefault("prompt_tokens", 0)
    usage.setdefault("completion_tokens", 0)
    while not turn.done:
        try:
            step = await run_in_threadpool(turn.step)   # tokenising: off the event loop
        except GptlabError:
            raise bad(f"This model's maximum context length is {backend.context_size} tokens and the "
                      "conversation does not fit; shorten it", "messages", "context_length_exceeded") from None
        usage["prompt_tokens"] = usage["prompt_tokens"] or len(step.ids)
        base = s.params(0)
        params = replace(base, stop_ids=list(base.stop_ids or []) + step.stop_ids)
        req = _submit_one(backend, step.ids, params)
        text, last = "", None
        async for _, ev in drain([req], request):
            if ev.finish_reason == "error":
                raise APIError(500, "generation failed inside the engine", type="server_error")
            text += ev.text
            if step.stream and ev.text:
                yield "text", ev.text
            if ev.finish_reason is not None:
                last = ev
        ids = req.completion.ids if getattr(req, "completion", None) is not None else backend.tok.encode(text)
        usage["completion_tokens"] += len(ids)
        before = len(turn.calls)
        # A tool may take its whole time limit: it runs in a worker thread, never on the event loop.
        await run_in_threadpool(turn.feed, ids, text, last.finish_reason if last else "stop",
                                getattr(last, "stop_token", None))
        if len(turn.calls) > before:
            yield "call", turn.calls[-1]


def _submit_one(backend, ids, params):
    try:
        return backend.submit(ids, params)
    except RuntimeError as e:
        raise APIError(503, f"server unavailable ({e})", type="server_error") from None


def make_turn(backend, messages: list[dict], body: dict, s: Sampling) -> ToolTurn:
    if s.n != 1:
        raise bad("'n' must be 1 when tools are used", "n")
    toolbox = getattr(backend, "toolbox", None)
    shown, force = parse_tools(body, toolbox.specs() if toolbox else [])
    ctx = backend.context_size
    return ToolTurn(backend.tok, messages, shown, toolbox, getattr(backend, "max_tool_calls", 4),
                    ctx - min(s.max_tokens, ctx // 4), force)


async def complete(backend, turn: ToolTurn, s: Sampling, request, usage: dict | None = None) -> dict:
    """The whole reply as one ``choices[0]`` object."""
    async for _ in drive(backend, turn, s, request, usage):
        pass
    message = {"role": "assistant", "content": turn.new[-1]["content"] if turn.pending is None else
               (turn.new[-1]["content"] or None), "refusal": None}
    if turn.pending is not None:
        message["tool_calls"] = [openai_call(turn.pending)]
    runs = _runs(turn)
    if runs:
        message["tool_runs"] = runs
    reason = "tool_calls" if turn.pending is not None else finish_reason(turn.finish_reason)
    return {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}


async def stream(backend, turn: ToolTurn, s: Sampling, request, chunk, usage: dict | None = None):
    """SSE chunks: text deltas as they come, a client call as OpenAI's tool-call deltas (the call's
    id, type and name first, then its arguments), server-side runs as ``tool_run`` deltas (extension)."""
    yield chunk({"role": "assistant", "content": ""}, None)
    async for kind, value in drive(backend, turn, s, request, usage):
        if kind == "text":
            yield chunk({"content": value}, None)
        elif value.result is not None:
            yield chunk({"tool_run": {"name": value.name, "arguments": value.arguments, "result": value.result}}, None)
        else:
            call = openai_call(value)
            yield chunk({"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                         "function": {"name": call["function"]["name"], "arguments": ""}}]}, None)
            yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": call["function"]["arguments"]}}]}, None)
    yield chunk({}, "tool_calls" if turn.pending is not None else finish_reason(turn.finish_reason))
