"""The chat REPL driven by a script: commands, streaming, history truncation, Ctrl-C mid-answer."""
import io

import pytest
import torch

from gptlab.chat.repl import ChatSession
from gptlab.data.formats import load_conversations
from gptlab.generate.engine import Engine, SamplingParams
from gptlab.model.gpt import GPT, GPTConfig


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine(small_tokenizer):
    torch.manual_seed(0)
    cfg = GPTConfig.preset("tiny", "gpt2", vocab_size=448, block_size=64, n_layer=2, n_embd=64)
    return Engine(GPT(cfg), small_tokenizer)


class Out(io.StringIO):
    """An output stream that can raise KeyboardInterrupt on a later write (Ctrl-C during an answer)."""

    def __init__(self):
        super().__init__()
        self.countdown = None

    def write(self, s):
        if self.countdown is not None:
            self.countdown -= 1
            if self.countdown < 0:
                self.countdown = None
                raise KeyboardInterrupt
        return super().write(s)


def session(engine, script, out, **kw):
    """Feed ``script`` lines; a KeyboardInterrupt item is Ctrl-C at the prompt; ("line", n) arms a
    Ctrl-C after n further writes once the line is entered. EOF (Ctrl-D) after the last line."""
    items = iter(script)

    def fake_input(prompt):
        out.write(prompt)
        item = next(items, None)
        if item is None:
            raise EOFError
        if item is KeyboardInterrupt:
            raise KeyboardInterrupt
        if isinstance(item, tuple):
            item, n = item
            out.countdown = n
        out.write(item + "\n")
        return item

    params = kw.pop("params", SamplingParams(max_new_tokens=6, temperature=0.8, seed=0))
    return ChatSession(engine, params, input_fn=fake_input, out=out, **kw)


def test_commands_and_save(engine, tmp_path):
    out = Out()
    save = tmp_path / "conv.jsonl"
    s = session(engine, ["/help", "hello there", "/temp 0", "/temp -1", "/temp abc", "/system Be brief.",
                         "how are you", f"/save {save}", "/bogus", KeyboardInterrupt, "/reset", "/quit",
                         "never read"], out)
    assert s.run() == 0
    text = out.getvalue()
    assert "/system TEXT" in text and "[temperature 0]" in text
    assert text.count("[usage: /temp X") == 2
    assert "[system message set: Be brief.]" in text and "[unknown command /bogus" in text and "^C" in text
    assert "[conversation cleared, system message kept]" in text
    assert text.count("gpt> ") == 2 and "never read" not in text
    assert s.params.temperature == 0 and s.turns == [] and s.system == "Be brief."
    convs = load_conversations(save)   # the conversations format SFT reads
    msgs = convs[0]["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[0]["content"] == "Be brief." and msgs[1]["content"] == "hello there"


def test_streamed_answer_equals_engine_greedy(engine):
    out = Out()
    s = session(engine, ["hello"], out, params=SamplingParams(max_new_tokens=8, temperature=0))
    s.run()
    from gptlab.tokenizer.chat_template import render_prompt
    expect = engine.generate([render_prompt(engine.tok, [{"role": "user", "content": "hello"}])],
                             SamplingParams(max_new_tokens=8, temperature=0))[0].text
    assert s.turns[-1] == {"role": "assistant", "content": expect}
    assert "gpt> " + expect in out.getvalue()


def test_history_truncation_keeps_system(engine):
    out = Out()
    lines = [f"message number {i}: to be or not to be, that is the question" for i in range(6)]
    s = session(engine, lines, out, system="You are a helpful assistant.",
                params=SamplingParams(max_new_tokens=8, temperature=0))
    s.run()
    text = out.getvalue()
    assert "[history truncated: dropped the" in text and "system message is kept" in text
    assert s.truncations >= 1
    assert s.messages[0] == {"role": "system", "content": "You are a helpful assistant."}
    assert s.turns[-2]["content"] == lines[-1]            # the newest turn always survives
    assert "message number 0" not in " ".join(m["content"] for m in s.turns)
    from gptlab.tokenizer.chat_template import render_prompt
    assert len(render_prompt(engine.tok, s.messages[:-1])) <= s.prompt_budget()


def test_message_too_long_is_refused(engine):
    out = Out()
    s = session(engine, ["word " * 200, "short"], out)
    s.run()
    assert "[message too long" in out.getvalue()
    assert [m["content"] for m in s.turns if m["role"] == "user"] == ["short"]


def test_ctrl_c_stops_answer_and_keeps_it(engine):
    out = Out()
    # Ctrl-C after two writes of the answer ("gpt> " is the first), then one more normal turn.
    s = session(engine, [("tell me a story", 2), "and then?"], out,
                params=SamplingParams(max_new_tokens=30, temperature=1.0, seed=3))
    assert s.run() == 0
    text = out.getvalue()
    assert "[stopped]" in text and text.count("gpt> ") == 2
    partial = s.turns[1]["content"]
    assert s.turns[0]["content"] == "tell me a story" and s.turns[1]["role"] == "assistant"
    assert "gpt> " + partial + " [stopped]" in text       # exactly what was shown is kept
    assert len(s.turns) == 4 and not engine.lock.locked()  # the engine was released for the next turn
