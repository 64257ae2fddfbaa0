"""The engine's tool loop: one assistant turn that may pause to call tools and resume with their results.

A ``ToolTurn`` is a small state machine over the chat template, independent of how tokens are produced:

1. answer: generate from the conversation; stop at end of turn or at ``<|tool_start|>`` (a call opens);
2. call: generate the call's text from there up to ``<|tool_end|>``; parse ``name {json}``;
3. a tool this turn may run (``ToolBox``) runs, its result is appended as a tool turn, and back to 1;
   a function the client defined (OpenAI function calling) ends the turn with that call pending.

After ``max_calls`` calls the model is not let into another one: generation stops at ``<|tool_start|>``
and the turn ends with what it wrote. A call that does not parse ends the turn too, its text kept as
content, so a confused model never loops. ``Engine.answer_with_tools`` drives many turns at once with
batched generation; the server drives one from asyncio with the same ``step``/``feed``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from gptlab.errors import GptlabError
from gptlab.tokenizer import TOOL_END, TOOL_START
from gptlab.tokenizer.chat_template import fit_prompt
from gptlab.tools import ToolBox, parse_call


@dataclass
class ToolCall:
    name: str
    arguments: dict
    result: str | None = None    # None: for the client to run


@dataclass
class Step:
    ids: list[int]               # the prompt to continue
    stop_ids: list[int]          # extra stop tokens for this phase
    stream: bool                 # the text generated is the reply (not a call being written)


@dataclass
class ToolTurn:
    tok: object
    messages: list[dict]                  # the conversation so far (ends with a user or tool turn)
    tools: list[dict] | None = None       # function definitions the model is shown
    toolbox: ToolBox | None = None        # the ones this side runs
    max_calls: int = 4
    budget: int = 10 ** 9                 # prompt tokens at most (older turns are dropped to fit)
    force: str | bool | None = None       # True: the first step must be a call; a name: a call to it
    new: list[dict] = field(default_factory=list)   # messages this turn added (calls and results)
    calls: list[ToolCall] = field(default_factory=list)
    content: str = ""                     # reply text of the current (last) assistant message
    pending: ToolCall | None = None       # a client-side call that ends the turn
    finish_reason: str | None = None      # "stop" | "length" | "tool_calls"
    dropped: int = 0
    _phase: str = "answer"
    _prefix: list[int] = field(default_factory=list)
    _forced_head: str = ""

    def __post_init__(self):
        self.start_id, self.end_id = self.tok.special_id(TOOL_START), self.tok.special_id(TOOL_END)
        if self.tools and (self.start_id is None or self.end_id is None):
            raise GptlabError("this tokenizer has no tool tokens (<|tool_start|>, <|tool_end|>)")
        if self.force:
            self._phase = "call"

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _prompt(self) -> list[int]:
        fitted = fit_prompt(self.tok, self.messages + self.new, self.budget, self.tools)
        self.dropped = fitted.dropped
        return fitted.ids

    def step(self) -> Step:
        """What to generate next (only while not ``done``)."""
        if self._phase == "answer":
            self._prefix = self._prompt()
            # Even with no tools, a call token ends the answer: a call is never shown as text.
            return Step(self._prefix, [self.start_id] if self.start_id is not None else [], True)
        if not self._prefix:   # forced: the call opens right after <|assistant_start|>
            self._prefix = self._prompt()
        head = self._prefix + [self.start_id]
        if isinstance(self.force, str) and not self.calls:
            self._forced_head = self.force + " "
            head += self.tok.encode(self._forced_head)
        return Step(head, [self.end_id], False)

    def feed(self, ids: list[int], text: str, finish_reason: str, stop_token: int | None = None) -> None:
        """Take what the last step generated (ids without the stop token, its text, why it ended)."""
        if self._phase == "answer":
            self.content += text
            if stop_token == self.start_id and self.start_id is not None and self.tools and len(self.calls) < self.max_calls:
                self._prefix = self._prefix + ids
                self._phase = "call"
            else:
                if stop_token is not None and stop_token == self.start_id:
                    self.content = self.content.rstrip()   # the call it was not let into
                self.finish_reason = "stop" if finish_reason in ("stop", "cancelled") else finish_reason
                self._close_reply()
            return
        call_text = self._forced_head + text
        self._forced_head = ""
        try:
            name, args = parse_call(call_text)
            known = {t["name"] for t in self.tools or []}
            if name not in known:
                raise ValueError(f"no tool named {name!r}")
        except ValueError:
            # Not a call anyone can run: keep it as the reply's text and end the turn.
            self.content = " ".join((self.content.strip(), call_text.strip())).strip()
            self.finish_reason = "stop"
            self._close_reply()
            return
        call = ToolCall(name, args)
        self.calls.append(call)
        self.new.append({"role": "assistant", "content": self.content.strip(),
                         "tool_calls": [{"name": name, "arguments": args}]})
        self.content = ""
        if self.toolbox is None or name not in self.toolbox.tools:
            self.pending = call
            self.finish_reason = "tool_calls"
            return
        call.result = self.toolbox.run(name, args)
        self.new.append({"role": "tool", "content": call.result})
        self._phase, self._prefix, self.force = "answer", [], None

    def give_up(self) -> None:
        """End the turn where it stands: the conversation, tool results included, outgrew the window."""
        self.finish_reason = "length"
        self._close_reply()

    def _close_reply(self) -> None:
        self.new.append({"role": "assistant", "content": self.content})


def answer_with_tools(engine, turns: list[ToolTurn], params, on_event=None) -> list[ToolTurn]:
    """Drive every turn to its end, one batched ``engine.generate`` per round of steps."""
    while live := [t for t in turns if not t.done]:
        steps = []
        for t in live:
            try:
                steps.append(t.step())
            except GptlabError:   # a result too long for the window: that turn ends, the others go on
                t.give_up()
                steps.append(None)
        live, steps = [t for t, s in zip(live, steps) if s], [s for s in steps if s]
        plist = [replace(params, stop_ids=list(params.stop_ids or []) + s.stop_ids) for s in steps]
        for t, c in zip(live, engine.generate([s.ids for s in steps], plist)):
            before = len(t.calls)
            t.feed(c.ids, c.text, c.finish_reason, c.stop_token)
            if on_event is not None and len(t.calls) > before:
                on_event(t, t.calls[-1])
    return turns


def stream_with_tools(engine, turn: ToolTurn, params):
    """Yield the reply's TokenEvents as they come and each ToolCall once it has run (or is pending)."""
    from gptlab.generate.engine import TokenEvent
    while not turn.done:
        try:
            s = turn.step()
        except GptlabError:
            turn.give_up()
            break
        p = replace(params, stop_ids=list(params.stop_ids or []) + s.stop_ids)
        text, last = "", None
        for ev in engine.stream(s.ids, p):
            text += ev.text
            if s.stream and ev.text:
                yield TokenEvent(ev.text, ev.token_id)
            if ev.finish_reason is not None:
                last = ev
        before = len(turn.calls)
        # Streamed events skip tokens that add no text, so the ids are the text's own encoding.
        turn.feed(engine.tok.encode(text), text, last.finish_reason if last else "stop",
                  last.stop_token if last else None)
        if len(turn.calls) > before:
            yield turn.calls[-1]
    yield TokenEvent("", None, turn.finish_reason)
