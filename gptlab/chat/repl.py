"""The terminal chat: a conversation loop around Engine.stream.

``ChatSession`` takes its input function and output stream as arguments, so tests drive it with a
scripted list of lines (and can raise KeyboardInterrupt from inside the stream to simulate Ctrl-C);
``gptlab chat`` passes the real ``input`` (with readline editing and history) and ``sys.stdout``.

Each turn renders the whole conversation with the chat template and streams the reply until the
end-of-turn token. When the conversation no longer fits the context window (leaving room for the
answer), the oldest turns are dropped for good (the system message stays) and the user is told.
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from typing import Callable, TextIO

from gptlab.errors import GptlabError
from gptlab.generate.engine import Engine, SamplingParams
from gptlab.io import atomic_write_jsonl
from gptlab.model.vision import image_tokens, stack_pictures
from gptlab.tokenizer.chat_template import fit_prompt

HELP = """commands:
  /system TEXT   set the system message (empty TEXT removes it)
  /temp X        set the sampling temperature (0 = greedy)
  /image PATH    show the model a picture with your next message (a vision run)
  /reset         forget the conversation (keeps the system message)
  /save FILE     save the conversation as JSONL in the conversations format
  /quit          leave (also Ctrl-D); Ctrl-C stops an answer"""


class ChatSession:
    def __init__(self, engine: Engine, params: SamplingParams, system: str | None = None,
                 input_fn: Callable[[str], str] = input, out: TextIO | None = None,
                 user_prompt: str = "you> ", bot_prompt: str = "gpt> ", toolbox=None, max_tool_calls: int = 4):
        self.engine, self.tok = engine, engine.tok
        self.toolbox, self.max_tool_calls = toolbox, max_tool_calls   # tools run only when the user enabled them
        self.tools = toolbox.specs() if toolbox else None
        self.params = params
        self.system = system or None
        self.turns: list[dict] = []          # user/assistant messages, oldest first
        self.input_fn = input_fn
        self.out = out or sys.stdout
        self.user_prompt, self.bot_prompt = user_prompt, bot_prompt
        self.truncations = 0
        self.pending: list[dict] = []        # pictures for the next user message
        self.image_tokens = image_tokens(engine.model)

    # ----- conversation state -------------------------------------------------------------------
    @property
    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def prompt_budget(self) -> int:
        """Tokens the prompt may use: the window minus room for an answer (at most half the window)."""
        block = self.engine.block_size
        return block - min(max(self.params.max_new_tokens, 1), block // 2)

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    # ----- one turn -----------------------------------------------------------------------------
    def attach(self, path: str) -> bool:
        """Read a picture for the next message; False (and a notice) when it cannot be used."""
        from gptlab.data.images import pixels_of, read_image_file
        if not self.image_tokens:
            self.say("[this model is text-only (it has no vision encoder), so it cannot take images]")
            return False
        try:
            img = read_image_file(path, self.engine.model.vision.config.image_size)
        except GptlabError as e:
            self.say(f"[{e}]")
            return False
        self.pending.append({"type": "image", "pixels": pixels_of(img), "path": path})
        self.say(f"[picture {path} attached to your next message]")
        return True

    def reply(self, user_text: str) -> str | None:
        """Add a user turn, stream the answer (Ctrl-C keeps what came so far); None if it cannot fit."""
        content = self.pending + [{"type": "text", "text": user_text}] if self.pending else user_text
        self.turns.append({"role": "user", "content": content})
        try:
            fitted = fit_prompt(self.tok, self.messages, self.prompt_budget(), self.tools, self.image_tokens)
        except GptlabError:
            self.turns.pop()
            self.say(f"[message too long: it does not fit the {self.engine.block_size}-token context window "
                     "with room for an answer; nothing was sent]")
            return None
        if fitted.dropped:
            # Drop for good, so the transcript the user sees (and /save writes) is what the model saw.
            self.turns = self.turns[fitted.dropped:]
            self.truncations += 1
            self.say(f"[history truncated: dropped the {fitted.dropped} oldest message(s) to fit the "
                     f"{self.engine.block_size}-token context window"
                     + ("; the system message is kept]" if self.system else "]"))
        self.pending = []
        self.out.write(self.bot_prompt)
        self.out.flush()
        pictures = stack_pictures(fitted.messages)
        if self.toolbox and pictures is None:
            return self._reply_with_tools(fitted.messages)
        parts: list[str] = []
        stream = self.engine.stream(fitted.ids, self.params, images=pictures)
        try:
            for ev in stream:
                if ev.text:
                    self.out.write(ev.text)
                    self.out.flush()
                    parts.append(ev.text)   # after the write: keep exactly what the user saw
        except KeyboardInterrupt:
            self.out.write(" [stopped]")
        finally:
            stream.close()   # releases the engine lock when we stop early
        self.say()
        answer = "".join(parts)
        self.turns.append({"role": "assistant", "content": answer})
        return answer

    def _reply_with_tools(self, messages: list[dict]) -> str:
        """Stream the answer, showing each tool call and its result on a line of its own."""
        from gptlab.generate.tool_loop import ToolCall, ToolTurn
        turn = ToolTurn(self.tok, messages, self.tools, self.toolbox, self.max_tool_calls, self.prompt_budget())
        stream = self.engine.stream_with_tools(turn, self.params)
        parts: list[str] = []
        try:
            for ev in stream:
                if isinstance(ev, ToolCall):
                    self.out.write(f"\n[{ev.name} {json.dumps(ev.arguments, ensure_ascii=False)} -> {ev.result}]\n")
                    parts = []
                elif ev.text:
                    self.out.write(ev.text)
                    parts.append(ev.text)
                self.out.flush()
        except KeyboardInterrupt:
            self.out.write(" [stopped]")
            turn.new.append({"role": "assistant", "content": "".join(parts)})
        finally:
            stream.close()
        self.say()
        self.turns += turn.new
        return turn.new[-1]["content"] if turn.new else ""

    # ----- commands -----------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            self.turns = []
            self.say("[conversation cleared" + (", system message kept]" if self.system else "]"))
        elif name == "/system":
            self.system = arg or None
            self.say(f"[system message set: {arg}]" if arg else "[system message removed]")
        elif name == "/temp":
            try:
                temp = float(arg)
                self.params = replace(self.params, temperature=temp)
            except (ValueError, GptlabError):
                self.say("[usage: /temp X with X >= 0, e.g. /temp 0.7]")
            else:
                self.say(f"[temperature {temp:g}]")
        elif name == "/save":
            if not arg:
                self.say("[usage: /save FILE]")
            elif not self.turns:
                self.say("[nothing to save yet]")
            else:
                try:
                    atomic_write_jsonl(arg, [{"messages": [_savable(m) for m in self.messages]}])
                except OSError as e:
                    self.say(f"[cannot save to {arg}: {e.strerror or e}]")
                else:
                    self.say(f"[saved {len(self.turns)} message(s) to {arg}]")
        elif name == "/image":
            if not arg:
                self.say("[usage: /image PATH]")
            else:
                self.attach(arg)
        elif name == "/help":
            self.say(HELP)
        else:
            self.say(f"[unknown command {name}; /help lists them]")
        return True

    # ----- the loop -----------------------------------------------------------------------------
    def run(self) -> int:
        self.say(f"chat with {self.engine.model.config.arch} ({self.engine.block_size}-token window, "
                 f"temperature {self.params.temperature:g}). /help for commands, /quit or Ctrl-D to leave.")
        if self.system:
            self.say(f"[system: {self.system}]")
        while True:
            try:
                line = self.input_fn(self.user_prompt)
            except EOFError:
                self.say()
                return 0
            except KeyboardInterrupt:   # Ctrl-C at the prompt clears the line, like a shell
                self.say("^C")
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return 0
                continue
            self.reply(line)


def _savable(m: dict) -> dict:
    """A message as JSON can hold it: a picture becomes an image_url part naming its file."""
    if isinstance(m["content"], str):
        return m
    return {**m, "content": [{"type": "image_url", "image_url": {"url": p["path"]}} if p["type"] == "image" else p
                             for p in m["content"]]}


def setup_readline(history_file) -> None:
    """Line editing and a persistent history for the real terminal (not available on every platform)."""
    try:
        import atexit
        import readline
    except ImportError:
        return
    try:
        readline.read_history_file(str(history_file))
    except (FileNotFoundError, OSError):
        pass
    readline.set_history_length(1000)

    def save():
        try:
            readline.write_history_file(str(history_file))
        except OSError:
            pass
    atexit.register(save)
