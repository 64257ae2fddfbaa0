"""The one generation engine: sample, eval, PPO rollouts, chat and the server all call this.

* KV cache: each prompt is prefilled into its own cache row, then all live rows decode together one
  token per step. Rows sit at different lengths, so a batch can mix prompts of any length, and a row
  that finishes is freed and can take a new request at once (continuous batching, ``Scheduler``).
* Sampling per row: temperature (0 = greedy), top-k, top-p, a seed of its own (the same request gives
  the same text whatever else shares the batch), stop token ids and stop strings.
* Text is produced incrementally: a delta is held back while it could still be the start of a stop
  string or ends inside a multi-byte character.
* When a row fills the context window it slides: the cache row is rebuilt from the last half window.
* Pictures: a prompt may come with images ([n, 3, S, S] pixels) for the ``<|image|>`` tokens in it
  (model/vision.py); they are read at prefill. A row that shows pictures does not slide (cutting a
  picture's tokens would leave the model an image it cannot place): it ends with "length".
* Tools: ``ToolTurn`` is one assistant turn that may call tools. Generation stops at the call's opening
  token, the call is generated up to its closing token, the tool runs (``gptlab.tools.ToolBox``: time
  and size limits, failures as text), its result is appended and generation resumes, up to a per-turn
  call limit. ``Engine.answer_with_tools`` drives many such turns in batches; the server drives one
  from asyncio with the same ``ToolTurn``.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field

import torch

from gptlab.device import autocast
from gptlab.errors import GptlabError


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)     # stop strings (not included in the text)
    stop_ids: list[int] | None = None                 # extra stop tokens (e.g. end of turn)
    seed: int | None = None
    ignore_eos: bool = False    # benchmarks: never end on the default stop ids (fixed-length answers)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        if self.max_new_tokens < 0:
            raise GptlabError("max_new_tokens must be >= 0")
        if self.temperature < 0:
            raise GptlabError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise GptlabError("top_p must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise GptlabError("top_k must be >= 1")


@dataclass
class Completion:
    ids: list[int]          # generated ids (stop token excluded)
    text: str
    finish_reason: str      # "stop" | "length" | "cancelled"
    prompt_tokens: int
    stop_token: int | None = None   # the stop id that ended it, if one did


@dataclass
class TokenEvent:
    text: str
    token_id: int | None
    finish_reason: str | None = None
    stop_token: int | None = None   # on the last event: the stop id that ended the row, if one did


def _uniform(gen: torch.Generator | None) -> torch.Tensor:
    return torch.rand(1, generator=gen)   # CPU: a row's seeded generator lives there


def _pick(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw, one per row of probs [N, V]: the first token whose cumulative probability
    exceeds u * total. One uniform per token keeps a seeded row's stream independent of its batch, and it
    is far cheaper than torch.multinomial."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    target = torch.minimum(u.to(cdf.device)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1)[:, 0]


def _plain(p: SamplingParams) -> bool:
    """Sampling with temperature only (no top-k / top-p): batched across rows in sample_tokens."""
    return p.temperature > 0 and p.top_k is None and p.top_p >= 1.0


def sample_token(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """One token from a row of logits [V] under ``p`` (greedy when temperature is 0)."""
    if p.temperature == 0 or _plain(p):
        return sample_tokens(logits[None], [p], [gen])[0]
    logits = logits.float() / p.temperature
    if p.top_k is not None and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < p.top_p   # smallest set reaching top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(_pick(probs[None], _uniform(gen))[0])


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams], gens: list) -> list[int]:
    """One token per row of logits [N, V]. Greedy rows and temperature-only rows are done with a few
    batched ops (per-row Python/torch calls dominated a decode step at batch 8+); rows with top-k/top-p
    go one by one. A row gets the same token here as from sample_token alone."""
    out = [0] * len(params)
    greedy, plain, other = [], [], []
    for i, p in enumerate(params):
        (greedy if p.temperature == 0 else plain if _plain(p) else other).append(i)
    if len(greedy) == len(params):   # all greedy (evals, benchmarks): no row gather
        return logits.argmax(-1).tolist()
    if greedy:
        for i, t in zip(greedy, logits[greedy].argmax(-1).tolist()):
            out[i] = t
    if plain:
        temps = torch.tensor([params[i].temperature for i in plain], device=logits.device)
        probs = torch.softmax(logits[plain].float() / temps[:, None], dim=-1)
        u = torch.cat([_uniform(gens[i]) for i in plain])
        for i, t in zip(plain, _pick(probs, u).tolist()):
            out[i] = t
    for i in other:
        out[i] = sample_token(logits[i], params[i], gens[i])
    return out


class _Row:
    """One sequence being generated: its context, output, text so far and what ends it."""

    def __init__(self, prompt: list[int], params: SamplingParams, stop_ids: set[int], tok, sink=None,
                 images: torch.Tensor | None = None):
        self.context = list(prompt)
        self.images = images if images is not None and len(images) else None
        self.prompt_tokens = len(prompt)
        self.params = params
        self.stop_ids = (set() if params.ignore_eos else stop_ids) | set(params.stop_ids or [])
        self.tok = tok
        self.out: list[int] = []
        self.emitted = ""
        self.finish: str | None = None
        self.stop_token: int | None = None
        self.sink = sink   # callable(TokenEvent) for streaming, or None
        self.gen = None
        if params.temperature > 0:
            self.gen = torch.Generator()
            self.gen.manual_seed(params.seed if params.seed is not None else
                                 int(torch.randint(0, 2**62, (1,))))
        if params.max_new_tokens == 0:
            self.finish = "length"
            self._emit(TokenEvent("", None, "length"))

    def _emit(self, ev: TokenEvent):
        if self.sink is not None:
            self.sink(ev)

    def text(self) -> str:
        return self.tok.decode(self.out, skip_special=True)

    def push(self, token: int) -> None:
        """Take a sampled token: end on a stop id/string or the length limit, else stream new text."""
        if token in self.stop_ids:
            self.stop_token = token
            self._finish("stop", self.text())
            return
        self.out.append(token)
        self.context.append(token)
        if self.sink is None and not self.params.stop:
            # Nobody streams and no stop string to find: decode once at the end.
            if len(self.out) >= self.params.max_new_tokens:
                self._finish("length", self.text())
            return
        text = self.text()
        for s in self.params.stop:
            at = text.find(s, max(0, len(self.emitted) - len(s)))
            if at != -1:
                self._finish("stop", text[:at])
                return
        if len(self.out) >= self.params.max_new_tokens:
            self._finish("length", text)
            return
        safe = len(text)
        if text.endswith("\ufffd"):          # an unfinished multi-byte character
            safe = len(text.rstrip("\ufffd"))
        for s in self.params.stop:           # hold back a possible start of a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        if safe > len(self.emitted):
            delta = text[len(self.emitted):safe]
            self.emitted = text[:safe]
            self._emit(TokenEvent(delta, token))

    def _finish(self, reason: str, final_text: str) -> None:
        self.finish = reason
        delta = final_text[len(self.emitted):] if final_text.startswith(self.emitted) else ""
        self.emitted = final_text
        self._emit(TokenEvent(delta, None, reason, self.stop_token))

    def completion(self) -> Completion:
        return Completion(self.out, self.emitted, self.finish or "cancelled", self.prompt_tokens, self.stop_token)


class Engine:
    def __init__(self, model, tokenizer, device: torch.device | str | None = None):
        self.model = model.eval()
        self.tok = tokenizer
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.block_size = model.config.block_size
        self.lock = threading.Lock()   # one forward pass at a time, whoever calls

    def default_stop_ids(self) -> set[int]:
        from gptlab.tokenizer import ASSISTANT_END
        ids = {self.tok.eot_id}
        end = self.tok.special_id(ASSISTANT_END)
        if end is not None:
            ids.add(end)
        return ids

    # ----- low-level steps ----------------------------------------------------------------------
    @torch.inference_mode()
    def _prefill(self, cache, slot: int, context: list[int], images: torch.Tensor | None = None) -> torch.Tensor:
        """Reset ``slot`` and run ``context`` (cropped to the window) into it; return its last logits."""
        keep = context[-(self.block_size - 1):] if len(context) >= self.block_size else context
        if images is not None:
            if len(keep) < len(context):
                raise GptlabError(f"a prompt with pictures must fit in the context window ({self.block_size} tokens)")
            images = images.to(self.device)
        cache.reset([slot])
        idx = torch.tensor([keep], dtype=torch.long, device=self.device)
        with autocast(self.device):
            # Only a picture prompt passes images: stand-in models (tests) need not know the keyword.
            pics = {} if images is None else {"images": images}
            h = self.model.hidden(idx, cache=cache, rows=[slot], **pics)
            return self.model.lm_logits(h[:, -1]).float()[0]

    @torch.inference_mode()
    def _decode(self, cache, slots: list[int], last: list[int]) -> torch.Tensor:
        """Logits [B, V] of one step for the rows ``slots``, whose last tokens are ``last``."""
        with autocast(self.device):
            logits = self.model.lm_logits(self.model.decode(last, cache, slots)).float()
        return logits.view(len(slots), -1)   # one row comes back as a vector

    @torch.inference_mode()
    def _full_forward(self, context: list[int], images: torch.Tensor | None = None) -> torch.Tensor:
        if images is not None and len(context) > self.block_size:
            raise GptlabError(f"a prompt with pictures must fit in the context window ({self.block_size} tokens)")
        idx = torch.tensor([context[-self.block_size:]], dtype=torch.long, device=self.device)
        with autocast(self.device):
            h = self.model.hidden(idx) if images is None else self.model.hidden(idx, images=images.to(self.device))
            return self.model.lm_logits(h[:, -1]).float()[0]

    def _step_rows(self, cache, active: dict[int, _Row]) -> None:
        """Advance every live row by one token (sliding rows whose window is full)."""
        lengths = cache.lengths
        full = [s for s in active if lengths[s] >= self.block_size]
        for s in full:  # rebuild from the last half window, then sample from that
            row = active[s]
            if row.images is not None:
                row._finish("length", row.text())
                continue
            logits = self._prefill(cache, s, row.context[-(self.block_size // 2):])
            row.push(sample_token(logits, row.params, row.gen))
        # Sorted: consecutive cache rows let attention read the cache through views instead of gathers.
        slots = sorted(s for s, r in active.items() if s not in full and r.finish is None)
        if slots:
            rows = [active[s] for s in slots]
            logits = self._decode(cache, slots, [r.context[-1] for r in rows])
            for row, t in zip(rows, sample_tokens(logits, [r.params for r in rows], [r.gen for r in rows])):
                row.push(t)

    # ----- public API ---------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 use_cache: bool = True, images: list | None = None) -> list[Completion]:
        """Complete each prompt (ids); one batch, rows freed as they finish. ``images``: per prompt, the
        pixels [n, 3, S, S] of its pictures (or None)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        stop = self.default_stop_ids()
        pics = images or [None] * len(prompts)
        rows = [_Row(self._check_prompt(p), sp, stop, self.tok, images=im) for p, sp, im in zip(prompts, plist, pics)]
        with self.lock:
            if use_cache:
                self._run_cached(rows)
            else:
                self._run_uncached(rows)
        return [r.completion() for r in rows]

    def stream(self, prompt: list[int], params: SamplingParams, images: torch.Tensor | None = None):
        """Yield TokenEvents for one prompt as tokens are produced (last one has finish_reason)."""
        events: list[TokenEvent] = []
        row = _Row(self._check_prompt(prompt), params, self.default_stop_ids(), self.tok, sink=events.append,
                   images=images)
        yield from events
        events.clear()
        if row.finish:
            return
        with self.lock:
            cache = self.model.new_cache(1)
            row.push(sample_token(self._prefill(cache, 0, row.context, row.images), row.params, row.gen))
            while True:
                yield from events
                events.clear()
                if row.finish:
                    return
                self._step_rows(cache, {0: row})

    def answer_with_tools(self, turns: list, params: SamplingParams, on_event=None) -> list:
        """Finish each ``gptlab.generate.tool_loop.ToolTurn``: pause at calls, run tools, resume."""
        from gptlab.generate.tool_loop import answer_with_tools
        return answer_with_tools(self, turns, params, on_event)

    def stream_with_tools(self, turn, params: SamplingParams):
        """One ToolTurn streamed: TokenEvents of the reply and each ToolCall as it runs."""
        from gptlab.generate.tool_loop import stream_with_tools
        return stream_with_tools(self, turn, params)

    def scheduler(self, max_batch: int = 16) -> "Scheduler":
        return Scheduler(self, max_batch)

    def _check_prompt(self, prompt: list[int]) -> list[int]:
        if not prompt:
            return [self.tok.eot_id]   # an empty prompt starts a fresh document
        return list(prompt)

    def _run_cached(self, rows: list[_Row]) -> None:
        cache = self.model.new_cache(len(rows))
        for s, row in enumerate(rows):
            if row.finish is None:
                row.push(sample_token(self._prefill(cache, s, row.context, row.images), row.params, row.gen))
        while True:
            active = {s: r for s, r in enumerate(rows) if r.finish is None}
            if not active:
                return
            self._step_rows(cache, active)

    def _run_uncached(self, rows: list[_Row]) -> None:
        """Reference path: recompute the whole (cropped) context for every token."""
        for row in rows:
            while row.finish is None:
                row.push(sample_token(self._full_forward(row.context, row.images), row.params, row.gen))


class Request:
    """A request in the scheduler: iterate (or ``aiter``) for TokenEvents; ``cancel`` frees its slot."""

    def __init__(self, prompt: list[int], params: SamplingParams, images: torch.Tensor | None = None):
        self.prompt, self.params, self.images = prompt, params, images
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.done = False
        self.completion: Completion | None = None

    def put(self, ev: TokenEvent):
        self.events.put(ev)

    def cancel(self):
        self.cancelled.set()

    def __iter__(self):
        while True:
            ev = self.events.get()
            yield ev
            if ev.finish_reason is not None:
                return

    async def aiter(self):
        """Events for asyncio callers; polls with a short back-off instead of parking a thread."""
        delay = 0.001
        while True:
            try:
                ev = self.events.get_nowait()
            except queue.Empty:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.02)
                continue
            delay = 0.001
            yield ev
            if ev.finish_reason is not None:
                return

    def result(self) -> Completion:
        text, reason = "", None
        for ev in self:
            text += ev.text
            reason = ev.finish_reason
        return self.completion or Completion([], text, reason or "cancelled", len(self.prompt))


class Scheduler:
    """Continuous batching: a background thread admits requests into free cache slots between decode
    steps, so concurrent callers share each forward pass instead of waiting in line."""

    def __init__(self, engine: Engine, max_batch: int = 16):
        self.engine, self.max_batch = engine, max_batch
        self.cache = engine.model.new_cache(max_batch)
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.active: dict[int, tuple[Request, _Row]] = {}
        self.wake = threading.Event()
        self.closed = False
        self.steps = 0
        self.thread = threading.Thread(target=self._loop, name="gptlab-scheduler", daemon=True)
        self.thread.start()

    def submit(self, prompt: list[int], params: SamplingParams, images: torch.Tensor | None = None) -> Request:
        if self.closed:
            raise RuntimeError("scheduler is closed")
        req = Request(self.engine._check_prompt(prompt), params, images)
        self.waiting.put(req)
        self.wake.set()
        return req

    def close(self):
        self.closed = True
        self.wake.set()
        self.thread.join(timeout=10)

    @property
    def busy_slots(self) -> int:
        return len(self.active)

    def _admit(self):
        stop = self.engine.default_stop_ids()
        while len(self.active) < self.max_batch:
            try:
                req = self.waiting.get_nowait()
            except queue.Empty:
                return
            if req.cancelled.is_set():
                req.put(TokenEvent("", None, "cancelled"))
                continue
            slot = next(s for s in range(self.max_batch) if s not in self.active)
            row = _Row(req.prompt, req.params, stop, self.engine.tok, images=req.images)

            def sink(ev, req=req, row=row):
                if ev.finish_reason is not None:   # the result is ready before the last event is seen
                    req.completion = row.completion()
                req.put(ev)
            row.sink = sink
            if row.finish is not None:             # e.g. max_new_tokens == 0
                sink(TokenEvent("", None, row.finish))
            if row.finish is None:
                try:
                    logits = self.engine._prefill(self.cache, slot, row.context, row.images)
                except GptlabError:   # e.g. pictures but no vision encoder: this request fails alone
                    row.finish = "error"
                    req.completion = row.completion()
                    req.put(TokenEvent("", None, "error"))
                    continue
                row.push(sample_token(logits, row.params, row.gen))
            if row.finish is None:
                self.active[slot] = (req, row)
            else:
                req.completion = row.completion()

    def _loop(self):
        while not self.closed:
            try:
                with self.engine.lock:
                    self._admit()
                    for slot, (req, row) in list(self.active.items()):
                        if req.cancelled.is_set():      # client went away: free the slot now
                            row.finish = "cancelled"
                            req.completion = row.completion()
                            req.put(TokenEvent("", None, "cancelled"))
                            del self.active[slot]
                    if self.active:
                        self.engine._step_rows(self.cache, {s: r for s, (_, r) in self.active.items()})
                        self.steps += 1
                        for slot, (req, row) in list(self.active.items()):
                            if row.finish is not None:
                                req.completion = row.completion()
                                del self.active[slot]
            except Exception as e:  # never leave callers hanging: fail every live request
                for slot, (req, row) in list(self.active.items()):
                    req.put(TokenEvent("", None, "error"))
                    del self.active[slot]
                print(f"gptlab scheduler error: {e!r}")
            if not self.active:
                self.wake.wait(timeout=0.5)
                self.wake.clear()
