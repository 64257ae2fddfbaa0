"""The model behind the server and how requests reach it: prompt fitting and the scheduler, from asyncio."""
from __future__ import annotations

import asyncio
import queue
import time
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from gptlab.model.vision import stack_pictures
from gptlab.tokenizer.chat_template import fit_prompt, has_chat_tokens
from gptlab.errors import GptlabError
from gptlab.serve.protocol import APIError, Sampling, bad


class Backend:
    """What the server needs from a model: its id, context size, tokenizer and a batching scheduler.

    Tests inject any object with the same attributes (``model_id``, ``context_size``, ``tok``,
    ``max_batch``, ``busy_slots``, ``submit(ids, params)``, ``close()``; optionally ``toolbox`` and
    ``max_tool_calls``: the tools this server runs itself, ``gptlab serve --tools``).
    """

    def __init__(self, engine, model_id: str, max_batch: int = 16, toolbox=None, max_tool_calls: int = 4):
        self.toolbox, self.max_tool_calls = toolbox, max_tool_calls
        self.engine = engine
        self.tok = engine.tok
        self.model_id = model_id
        self.context_size = int(engine.model.config.block_size)
        self.max_batch = max_batch
        self.created = int(time.time())
        self.scheduler = engine.scheduler(max_batch=max_batch)
        vision = getattr(engine.model, "vision", None)
        # A picture takes image_tokens positions of the prompt; 0: a text-only model, which refuses them.
        self.image_tokens = vision.config.n_tokens if vision is not None else 0
        self.image_size = vision.config.image_size if vision is not None else 0

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

    def submit(self, prompt_ids: list[int], params, images=None):
        return self.scheduler.submit(prompt_ids, params, images)

    def close(self) -> None:
        self.scheduler.close()


def decode_pictures(backend, messages: list[dict]) -> None:
    """Give every image part of ``messages`` its pixels (uint8 [3, S, S]); bad images -> 400."""
    from gptlab.data.images import decode_image, pixels_of
    k = getattr(backend, "image_tokens", 0)
    for m in messages:
        for p in m["content"] if isinstance(m["content"], list) else ():
            if p["type"] != "image" or "pixels" in p:
                continue
            if not k:
                raise bad("this model is text-only (it has no vision encoder), so it cannot take images",
                          p.get("where", "messages"), "image_not_supported")
            try:
                p["pixels"] = pixels_of(decode_image(p["data"], "the image", backend.image_size))
            except GptlabError as e:
                raise bad(f"{p.get('where', 'messages')}: {e}", p.get("where", "messages"), "invalid_image") from None


def _fit(backend, messages: list[dict], max_tokens: int):
    if not has_chat_tokens(backend.tok):
        raise bad("this model's tokenizer has no chat tokens; use /v1/completions", "messages")
    decode_pictures(backend, messages)
    ctx = backend.context_size
    what = "the last message alone does not fit"
    for budget in (ctx - min(max_tokens, ctx // 4), ctx - 1):
        try:
            fitted = fit_prompt(backend.tok, messages, budget, image_tokens=getattr(backend, "image_tokens", 0))
            return fitted.ids, fitted.dropped, stack_pictures(fitted.messages)
        except GptlabError as e:
            if "system message" in str(e):
                what = "the system message does not fit"
    raise bad(f"This model's maximum context length is {ctx} tokens and {what}; shorten it", "messages",
              "context_length_exceeded")


async def fit_chat(backend, messages: list[dict], max_tokens: int):
    """Prompt ids for ``messages``, how many old turns were dropped to fit the context window, and the
    pixels of the pictures left in it (None without any).

    Aim to leave room for the answer (up to a quarter of the window); if only the bare prompt fits, use
    that (the engine slides its window while answering); if not even the last message fits: 400.
    Tokenising runs in a worker thread so the event loop (other requests, /health) never waits on it.
    """
    return await run_in_threadpool(_fit, backend, messages, max_tokens)


# ----- driving the scheduler from asyncio ----------------------------------------------------------
class ClientGone(Exception):
    """The HTTP client disconnected; its requests have been cancelled."""


def finish_reason(reason: str | None) -> str:
    return reason if reason in ("stop", "length") else "stop"


def submit(backend, prompts: list[list[int]], s: Sampling, images=None) -> list:
    """n requests per prompt; choice index = prompt * n + j. ``images``: the pixels of the (one)
    prompt's pictures."""
    try:
        if images is not None:
            return [backend.submit(p, s.params(j), images=images) for p in prompts for j in range(s.n)]
        return [backend.submit(p, s.params(j)) for p in prompts for j in range(s.n)]
    except RuntimeError as e:   # the scheduler is closed: the server is shutting down
        raise APIError(503, f"server unavailable ({e})", type="server_error") from None


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
