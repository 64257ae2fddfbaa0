"""``/api`` and ``/``: the chat page and its endpoints (conversations, messages, regenerate, thumbs,
side-by-side comparisons). Every reply and rating lands in SQLite (``store.py``) and can be exported as
training data, which is why ``guard.py`` lets only the page itself (same origin, CSRF token) write here.

Store calls run in worker threads (``db``) so a slow disk or a long history never holds the event loop;
the one exception is saving a streamed answer as its stream ends (one bounded insert, done inline so
that it happens even while the request is being torn down).
"""
from __future__ import annotations

import base64
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from gptlab.errors import GptlabError
from gptlab.serve import functions
from gptlab.serve.backend import ClientGone, drain, finish_reason, fit_chat, submit
from gptlab.data.images import image_mime as _mime
from gptlab.serve.protocol import (SSE_HEADERS, APIError, Limits, Sampling, parse_parts, bad, is_int, not_found,
                                   parse_sampling, read_json, row_id, sse)
from gptlab.serve.store import Store
from gptlab.tokenizer.chat_template import max_token_chars

STATIC = Path(__file__).parent / "static"


def _doc(**props) -> dict:
    """Request-body documentation for /openapi.json (validation is done by hand, in the routes)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "properties": props}}}}}


_SAMPLING = {"temperature": {"type": "number"}, "top_p": {"type": "number"}, "max_tokens": {"type": "integer"},
             "seed": {"type": "integer"}}
_CONVERSATION_DOC = _doc(title={"type": "string"}, system_prompt={"type": "string"})
_MESSAGE_DOC = _doc(content={"type": "string"}, **_SAMPLING)


def _web_sampling(body: dict, limits: Limits) -> Sampling:
    s = parse_sampling({k: body.get(k) for k in ("temperature", "top_p", "max_tokens", "seed")}, limits)
    s.stream = True
    return s


def _content(body: dict) -> str:
    content = body.get("content")
    if not isinstance(content, str) or not content.strip():
        raise bad("'content' must be a non-empty string", "content")
    return content


def _pictures(body: dict) -> list[dict]:
    """The message's attached pictures ('images': a list of data: URLs) as image parts; checked as the
    API checks them (data: URLs only, at most a few, decoded before anything is stored)."""
    urls = body.get("images") or []
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise bad("'images' must be a list of data: URLs", "images")
    if len(urls) > 4:
        raise bad("at most 4 images per message", "images")
    return parse_parts([{"type": "image_url", "image_url": {"url": u}} for u in urls], "images", "user")


def _data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


MAX_TITLE_CHARS = 200


def _strings(body: dict, *names: str) -> list:
    values = [body.get(n) for n in names]
    if any(v is not None and not isinstance(v, str) for v in values):
        raise bad(" and ".join(f"'{n}'" for n in names) + " must be strings")
    return values


def _conversation_fields(body: dict, backend) -> tuple[str | None, str | None]:
    """(title, system prompt) of a create/update body. Both are bounded: every conversation is listed
    in full by GET /api/conversations, and a system prompt longer than the context could ever hold
    would only fail at the first message."""
    title, system = _strings(body, "title", "system_prompt")
    if title is not None and len(title) > MAX_TITLE_CHARS:
        raise bad(f"'title' is longer than {MAX_TITLE_CHARS} characters", "title")
    most = backend.context_size * max_token_chars(backend.tok)
    if system is not None and len(system) > most:
        raise bad(f"'system_prompt' is longer than this model's context ({backend.context_size} tokens) could "
                  "hold", "system_prompt", "context_length_exceeded")
    return title, system


def with_versions(thread: list[dict], everything: list[dict]) -> list[dict]:
    """Mark each shown message with how many versions (regenerations) it has, for "2 / 3" labels."""
    siblings: dict[tuple, list[int]] = {}
    for x in everything:   # oldest first, so each list is in version order
        siblings.setdefault((x["role"], x["parent_id"]), []).append(x["id"])
    for m in thread:
        sibs = siblings.get((m["role"], m["parent_id"]), [m["id"]])
        m["versions"], m["version"] = len(sibs), (sibs.index(m["id"]) + 1 if m["id"] in sibs else 1)
    return thread


def page_router(csrf_token: str) -> APIRouter:
    html = (STATIC / "index.html").read_text(encoding="utf-8").replace("{{CSRF_TOKEN}}", csrf_token)
    page = APIRouter()

    @page.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    return page


def router(backend, store: Store, limits: Limits) -> APIRouter:
    api = APIRouter(prefix="/api")

    async def db(fn, *args, **kw):
        return await run_in_threadpool(fn, *args, **kw)

    async def conversation(cid: int) -> dict:
        conv = await db(store.get_conversation, row_id("conversation", cid))
        if conv is None:
            raise not_found("conversation", cid)
        return conv

    async def message(mid: int) -> dict:
        msg = await db(store.get_message, row_id("message", mid))
        if msg is None:
            raise not_found("message", mid)
        return msg

    def leaf(cid: int) -> int | None:
        thread = store.thread(cid)
        return thread[-1]["id"] if thread else None

    async def prepare(cid: int, upto: int | None, s: Sampling, new_user: str | None = None, tools: bool = True,
                      pictures: list[dict] | None = None):
        """Prompt ids for the path to ``upto`` (plus a user message not stored yet), and the pixels of
        the pictures in it: fit before storing, so a message that can never fit (or a picture that
        cannot be read) is refused without leaving a dangling turn behind. With the server's own
        tools, the conversation itself (the tool turn fits it, tools described); a conversation with
        pictures is answered without tools."""
        messages = await db(store.chat_messages, cid, upto, True)
        if new_user is not None:
            messages.append({"role": "user", "content": (pictures or []) + [{"type": "text", "text": new_user}]
                             if pictures else new_user})
        ids, dropped, images = await fit_chat(backend, messages, s.max_tokens)
        if images is None and tools and getattr(backend, "toolbox", None) and \
                not any(isinstance(m["content"], list) for m in messages):
            return messages, dropped, None
        return ids, dropped, images

    async def reply_stream(request: Request, cid: int, parent_id: int, ids, dropped: int,
                           s: Sampling, start: dict, regenerated_from: int | None = None, images=None):
        """Stream one answer; store it when it ends, also when the user stops it (the fetch is aborted).
        ``ids`` is a conversation (a list of messages) when the server runs tools: each run is sent as a
        ``tool`` event and stored with the answer."""
        req, text, finish, saved, runs = None, "", None, None, []
        try:
            yield sse({"type": "start", "truncated_turns": dropped, **start})
            if ids and isinstance(ids[0], dict):
                turn = functions.make_turn(backend, ids, {}, s)
                async for kind, value in functions.drive(backend, turn, s, request):
                    if kind == "text":
                        text += value
                        yield sse({"type": "delta", "text": value})
                    else:
                        runs.append({"name": value.name, "arguments": value.arguments, "result": value.result or ""})
                        yield sse({"type": "tool", **runs[-1]})
                finish = turn.finish_reason
            else:
                req = submit(backend, [ids], s, images)[0]
                async for _, ev in drain([req], request):
                    text += ev.text
                    finish = ev.finish_reason or finish
                    if ev.text:
                        yield sse({"type": "delta", "text": ev.text})
        except ClientGone:
            pass
        except APIError as e:   # e.g. the conversation with its tool results outgrew the window
            finish = "stop"
            yield sse({"type": "error", "message": e.message})
        finally:
            if req is not None:
                req.cancel()
            try:
                saved = store.add_message(cid, "assistant", text, parent_id=parent_id, model=backend.model_id,
                                          finish_reason=finish_reason(finish) if finish else "stopped",
                                          regenerated_from=regenerated_from)
                if runs:
                    store.add_tool_runs(saved["id"], runs)
                    saved["tool_runs"] = runs
            except GptlabError:   # the conversation was deleted meanwhile
                saved = None
        if finish == "error":
            yield sse({"type": "error", "message": "generation failed inside the engine"})
        yield sse({"type": "done", "message": saved})

    def sse_response(gen) -> StreamingResponse:
        return StreamingResponse(gen, media_type="text/event-stream", headers=SSE_HEADERS)

    @api.get("/conversations")
    async def list_conversations():
        return {"data": await db(store.list_conversations)}

    @api.post("/conversations", openapi_extra=_CONVERSATION_DOC)
    async def create_conversation(request: Request):
        body = await read_json(request)
        title, system = await run_in_threadpool(_conversation_fields, body, backend)
        return await db(store.create_conversation, title or "", system or "")

    @api.patch("/conversations/{cid}", openapi_extra=_CONVERSATION_DOC)
    async def update_conversation(cid: int, request: Request):
        await conversation(cid)
        body = await read_json(request)
        title, system = await run_in_threadpool(_conversation_fields, body, backend)
        return await db(store.update_conversation, cid, title, system)

    @api.delete("/conversations/{cid}")
    async def delete_conversation(cid: int):
        if not await db(store.delete_conversation, row_id("conversation", cid)):
            raise not_found("conversation", cid)
        return {"deleted": True, "id": cid}

    def _conversation_view(cid: int) -> dict:
        conv = store.get_conversation(cid)
        if conv is None:
            raise not_found("conversation", cid)
        thread = with_versions(store.thread(cid), store.messages(cid))
        runs = store.tool_runs([m["id"] for m in thread if m["role"] == "assistant"])
        pics = store.images([m["id"] for m in thread if m["role"] == "user"])
        for m in thread:
            if m["id"] in runs:
                m["tool_runs"] = runs[m["id"]]
            if m["id"] in pics:
                m["images"] = [_data_url(mime, data) for mime, data in pics[m["id"]]]
        pending = None
        if thread and thread[-1]["role"] == "user":
            open_ = [c for c in store.comparisons(cid) if c["message_id"] == thread[-1]["id"] and not c["choice"]]
            pending = open_[-1] if open_ else None
        return {"conversation": conv, "messages": thread, "pending_comparison": pending}

    @api.get("/conversations/{cid}")
    async def get_conversation(cid: int):
        return await db(_conversation_view, row_id("conversation", cid))

    @api.post("/conversations/{cid}/messages", openapi_extra=_MESSAGE_DOC)
    async def post_message(cid: int, request: Request):
        await conversation(cid)
        body = await read_json(request)
        content, s, pictures = _content(body), _web_sampling(body, limits), _pictures(body)
        parent = await db(leaf, cid)
        ids, dropped, images = await prepare(cid, parent, s, content, pictures=pictures)
        user = await db(store.add_message, cid, "user", content, parent_id=parent)
        if pictures:
            await db(store.add_images, user["id"], [(_mime(p["data"]), p["data"]) for p in pictures])
            user["images"] = [_data_url(_mime(p["data"]), p["data"]) for p in pictures]
        return sse_response(reply_stream(request, cid, user["id"], ids, dropped, s, {"user_message": user},
                                         images=images))

    @api.post("/messages/{mid}/regenerate", openapi_extra=_doc(**_SAMPLING))
    async def regenerate(mid: int, request: Request):
        old = await message(mid)
        if old["role"] != "assistant" or old["parent_id"] is None:
            raise bad("only an assistant answer can be regenerated")
        body = await read_json(request)
        s = _web_sampling(body, limits)
        ids, dropped, images = await prepare(old["conversation_id"], old["parent_id"], s)
        return sse_response(reply_stream(request, old["conversation_id"], old["parent_id"], ids, dropped, s,
                                         {"regenerated_from": mid}, regenerated_from=mid, images=images))

    @api.post("/messages/{mid}/feedback", openapi_extra=_doc(rating={"type": "integer"}))
    async def feedback(mid: int, request: Request):
        await message(mid)
        body = await read_json(request)
        rating = body.get("rating")
        if not is_int(rating) or rating not in (-1, 0, 1):
            raise bad("'rating' must be 1 (thumbs up), -1 (thumbs down) or 0 (clear)", "rating")
        return {"message_id": mid, "rating": rating, "feedback": await db(store.set_feedback, mid, rating)}

    @api.post("/conversations/{cid}/compare", openapi_extra=_MESSAGE_DOC)
    async def compare(cid: int, request: Request):
        """Two answers to one new user message, streamed side by side; the user then picks one."""
        await conversation(cid)
        body = await read_json(request)
        content, s = _content(body), _web_sampling(body, limits)
        if s.temperature == 0:
            s.temperature = 1.0   # two greedy answers would be identical: nothing to compare
        s.n, s.seed = 2, None
        parent = await db(leaf, cid)
        ids, dropped, images = await prepare(cid, parent, s, content, tools=False)   # side by side: plain answers
        user = await db(store.add_message, cid, "user", content, parent_id=parent)
        prompt = await db(store.chat_messages, cid, user["id"])

        async def gen():
            reqs, texts, saved = [], ["", ""], None
            try:
                yield sse({"type": "start", "user_message": user, "truncated_turns": dropped,
                           "temperature": s.temperature})
                reqs = submit(backend, [ids], s, images)
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

    def _choose(kid: int, choice: str) -> dict:
        if store.get_comparison(kid) is None:
            raise not_found("comparison", kid)
        comp = store.set_comparison_choice(kid, choice)
        msg = None
        # The preferred answer (a on a tie) continues the conversation, unless it already moved on.
        cid, uid = comp["conversation_id"], comp["message_id"]
        if cid is not None and uid is not None and leaf(cid) == uid:
            text = comp["answer_b"] if choice == "b" else comp["answer_a"]
            msg = store.add_message(cid, "assistant", text, parent_id=uid, model=comp["model"],
                                    finish_reason="stop")
        return {"comparison": comp, "message": msg}

    @api.post("/comparisons/{kid}/choice", openapi_extra=_doc(choice={"type": "string"}))
    async def choose(kid: int, request: Request):
        body = await read_json(request)
        choice = body.get("choice")
        if choice not in ("a", "b", "tie"):
            raise bad("'choice' must be 'a', 'b' or 'tie'", "choice")
        return await db(_choose, row_id("comparison", kid), choice)

    return api
