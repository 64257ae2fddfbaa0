"""Tools at inference: the calculator, the search index, tool turns in the chat template and the
engine's tool loop (pause at a call, run it with limits, resume)."""
import json
import os
import re
import time
from fractions import Fraction

import pytest
from conftest import cli, user_error
from scripted_lm import ScriptedLM

from gptlab.errors import GptlabError
from gptlab.generate.engine import Engine, SamplingParams
from gptlab.generate.tool_loop import ToolTurn
from gptlab.tokenizer.chat_template import fit_prompt, render, render_prompt
from gptlab.tools import Tool, ToolBox, argument_problems, builtin_toolbox, check_spec, describe, parse_call
from gptlab.tools.calculator import evaluate, show
from gptlab.tools.search import build_index, chunk_text, search


# ----- calculator -------------------------------------------------------------------------------------
@pytest.mark.parametrize("expr,value", [
    ("4821 * 3907", "18835647"), ("1234 + 5678", "6912"), ("0.1 + 0.2", "0.3"), ("1/3 * 3", "1"),
    ("2 ^ 3 ^ 2", "512"), ("-3 ^ 2", "-9"), ("(1 + 2) * -3", "-9"), ("7 // 2", "3"), ("7 % 3", "1"),
    ("2 ** -2", "0.25"), ("1/8", "0.125"), ("12 × 3 ÷ 4", "9"), ("99999999999999999999 + 1", "100000000000000000000"),
])
def test_calculator_is_exact(expr, value):
    assert show(evaluate(expr)) == value


def test_calculator_fractions_and_refusals():
    assert evaluate("1/3") == Fraction(1, 3) and show(evaluate("2/3")).startswith("2/3 (about 0.666666")
    for bad in ["", "1 +", "(1 + 2", "1 / 0", "abc", "__import__('os').system('true')", "2 ^ 0.5", "9 ^ 9 ^ 9",
                "1" * 400, "(" * 60 + "1" + ")" * 60, "1 2"]:
        with pytest.raises(GptlabError):
            evaluate(bad)


# ----- tool descriptions and calls ------------------------------------------------------------------------
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                          "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}


def test_specs_calls_and_argument_checks():
    assert describe(WEATHER) == 'get_weather(city: string, unit?: "c"|"f") - Current weather in a city'
    assert parse_call('get_weather {"city": "Paris"}') == ("get_weather", {"city": "Paris"})
    for bad in ['{"city": 1}', 'get_weather {city: Paris}', 'get_weather [1]']:
        with pytest.raises(ValueError):
            parse_call(bad)
    assert argument_problems(WEATHER["parameters"], {"city": "Paris", "unit": "c"}) == []
    assert argument_problems(WEATHER["parameters"], {"unit": "k", "town": "x"}) == [
        "arguments should be one of ['c', 'f']".replace("arguments", "arguments.unit"), "arguments.city is required",
        "arguments.town is not a parameter"] or len(argument_problems(WEATHER["parameters"], {"unit": "k"})) == 2
    check_spec(WEATHER)
    for bad in [{"name": "has space"}, {"name": "f", "parameters": {"type": "strang"}},
                {"name": "f", "parameters": {"type": "string"}}, {"name": "f", "parameters": {"type": "object",
                                                                                         "required": "x"}}]:
        with pytest.raises(GptlabError):
            check_spec(bad)


def test_toolbox_limits_never_raise():
    def boom(args, deadline):
        raise RuntimeError("kaput")

    def slow(args, deadline):
        time.sleep(2)
        return "late"
    obj = {"type": "object", "properties": {}}
    box = ToolBox({"boom": Tool("boom", "", obj, boom), "slow": Tool("slow", "", obj, slow),
                   "big": Tool("big", "", obj, lambda a, d: "x" * 5000)}, timeout_s=0.2, max_chars=100)
    assert box.run("boom", {}) == "error: RuntimeError: kaput"
    assert box.run("slow", {}).startswith("error: slow took longer")
    assert len(box.run("big", {})) == 100
    assert box.run("nope", {}).startswith("error: no tool")
    calc = builtin_toolbox("calculator")
    assert calc.run("calculator", {"expression": "1/0"}) == "error: division by zero"
    assert calc.run("calculator", {"expr": "1"}).startswith("error: arguments.expression is required")


# ----- the search index -----------------------------------------------------------------------------------
def _docs(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "zorbland.md").write_text("# Zorbland\n\nThe capital of Zorbland is Quellport.\n\n"
                                   "Zorbland exports blue marmalade.\n", encoding="utf-8")
    (d / "notes.txt").write_text("The river Ossa is 412 kilometres long.\n", encoding="utf-8")
    (d / "facts.jsonl").write_text(json.dumps({"title": "Mount Vell", "text": "Mount Vell is 3120 metres high."})
                                   + "\n", encoding="utf-8")
    (d / "ignored.csv").write_text("a,b\n", encoding="utf-8")
    return d


def test_index_search_incremental_and_atomic(tmp_path, capsys):
    d, index = _docs(tmp_path), tmp_path / "docs.index"
    rc, out, _ = cli(capsys, "index", d, "--out", index, "--query", "How long is the river Ossa?")
    assert rc == 0 and "3 files added" in out and "[notes.txt] The river Ossa is 412" in out
    assert search(index, "capital of Zorbland")[0] == ("zorbland.md", "# Zorbland The capital of Zorbland is Quellport. "
                                                      "Zorbland exports blue marmalade.")
    assert search(index, "how high is Mount Vell?")[0][0] == "facts.jsonl"
    assert search(index, 'NEAR("x" OR) * ^ -- "') == [] or isinstance(search(index, 'NEAR("x" OR)'), list)
    # change one file, delete another: only those are touched
    (d / "notes.txt").write_text("The river Ossa is 500 kilometres long.\n", encoding="utf-8")
    (d / "facts.jsonl").unlink()
    inode = os.stat(index).st_ino
    assert build_index(d, index) == {"added": 0, "updated": 1, "removed": 1, "unchanged": 1, "passages": 2}
    assert os.stat(index).st_ino != inode     # a new file moved over the old one
    assert "500" in search(index, "river Ossa")[0][1] and search(index, "Vell") == []
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert build_index(d, index)["unchanged"] == 2
    # a bad document leaves the old index as it was
    (d / "bad.jsonl").write_text('{"title": "no text"}\n', encoding="utf-8")
    before = index.read_bytes()
    assert "bad.jsonl:1" in user_error(capsys, "index", d, "--out", index)
    assert index.read_bytes() == before
    assert "not a folder" in user_error(capsys, "index", tmp_path / "nope", "--out", index)
    (tmp_path / "junk.index").write_text("hello", encoding="utf-8")
    assert "search index" in user_error(capsys, "index", d, "--out", tmp_path / "junk.index")


def test_chunking_keeps_passages_short():
    text = "# A\n\n" + " ".join(f"Sentence {i} is here." for i in range(60)) + "\n\n# B\n\nShort."
    chunks = chunk_text(text, max_words=30)
    assert all(len(c.split()) <= 30 for c in chunks) and chunks[-1].startswith("# B")


# ----- the chat template -----------------------------------------------------------------------------------
CALL_CONVO = [{"role": "user", "content": "What is 1234 * 5678?"},
              {"role": "assistant", "content": "", "tool_calls": [{"name": "calculator",
                                                                    "arguments": {"expression": "1234 * 5678"}}]},
              {"role": "tool", "content": "7006652"},
              {"role": "assistant", "content": "1234 * 5678 = 7006652."}]


def test_template_renders_calls_and_masks_results(small_tokenizer):
    tok = small_tokenizer
    tools = [builtin_toolbox("calculator").tools["calculator"].spec()]
    ids, mask = render(tok, CALL_CONVO, tools)
    assert tok.decode(ids) == (
        "<|system_start|>Tools:\ncalculator(expression: string) - exact arithmetic<|system_end|>"
        "<|user_start|>What is 1234 * 5678?<|user_end|><|assistant_start|><|tool_start|>calculator "
        '{"expression": "1234 * 5678"}<|tool_end|><|assistant_end|><|tool_start|>7006652<|tool_end|>'
        "<|assistant_start|>1234 * 5678 = 7006652.<|assistant_end|>")
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == ('<|tool_start|>calculator {"expression": "1234 * 5678"}<|tool_end|><|assistant_end|>'
                       "1234 * 5678 = 7006652.<|assistant_end|>")   # the tool's result is not trained on
    fitted = fit_prompt(tok, CALL_CONVO[:3], 10 ** 6, tools)
    assert fitted.ids == render_prompt(tok, CALL_CONVO[:3], tools) and fitted.messages == CALL_CONVO[:3]
    with pytest.raises(GptlabError):
        render(tok, [{"role": "user", "content": "x", "tool_calls": [{"name": "f", "arguments": {}}]}])


# ----- the engine's tool loop -----------------------------------------------------------------------------
def _script(text: str) -> str:
    """A model that calls the calculator when asked for a product and reads the result back."""
    if "loop" in text:
        return '<|tool_start|>calculator {"expression": "1 + 1"}<|tool_end|>'
    if text.endswith("<|tool_end|>"):
        result = text.rsplit("<|tool_start|>", 1)[1][: -len("<|tool_end|>")]
        return f"The answer is {result}."
    if "garble" in text:
        return "Sure. <|tool_start|>calculator {oops<|tool_end|>"
    if "*" in text:
        q = text.rsplit("<|user_start|>", 1)[1].split("<|user_end|>")[0]
        return 'Let me compute. <|tool_start|>calculator {"expression": "%s"}<|tool_end|>' % q.split("is ")[1].rstrip("?")
    return "Hello there."


def test_engine_pauses_runs_the_tool_and_resumes(small_tokenizer):
    tok = small_tokenizer
    engine = Engine(ScriptedLM(tok, _script), tok)
    box = builtin_toolbox("calculator")
    params = SamplingParams(max_new_tokens=60, temperature=0)
    ask = lambda q, **kw: ToolTurn(tok, [{"role": "user", "content": q}], box.specs(), box, **kw)  # noqa: E731
    turns = engine.answer_with_tools([ask("What is 4821 * 3907?"), ask("hi"), ask("What is 1 / 0 * 3?"),
                                      ask("loop forever", max_calls=2), ask("garble")], params)
    product, hello, failing, looping, garbled = turns
    assert [c.result for c in product.calls] == ["18835647"]
    assert product.new[-1] == {"role": "assistant", "content": "The answer is 18835647."}
    assert product.new[0]["content"] == "Let me compute." and product.finish_reason == "stop"
    assert hello.calls == [] and hello.new == [{"role": "assistant", "content": "Hello there."}]
    assert failing.calls[0].result == "error: division by zero"          # an error string, not a crash
    assert failing.new[-1]["content"] == "The answer is error: division by zero."
    assert len(looping.calls) == 2 and looping.finish_reason == "stop"    # the per-turn call limit
    assert garbled.calls == [] and garbled.new[-1]["content"] == "Sure. calculator {oops"
    # streamed: the reply's text and each call, in order
    events = list(engine.stream_with_tools(ask("What is 12 * 12?"), params))
    text = "".join(e.text for e in events if hasattr(e, "text"))
    calls = [e for e in events if hasattr(e, "result")]
    assert text == "Let me compute. The answer is 144." and [c.result for c in calls] == ["144"]
    # without tools the model is never let into a call: it ends where the call would start
    plain = ToolTurn(tok, [{"role": "user", "content": "What is 2 * 3?"}])
    engine.answer_with_tools([plain], params)
    assert plain.calls == [] and plain.new[-1]["content"] == "Let me compute."


def test_index_and_tools_flags_are_checked(tmp_path, capsys):
    with pytest.raises(GptlabError, match="needs --index"):
        builtin_toolbox("search")
    with pytest.raises(GptlabError, match="unknown tool"):
        builtin_toolbox("calculator,shell")
    with pytest.raises(GptlabError, match="no such file"):
        builtin_toolbox("search", str(tmp_path / "missing.index"))


def test_chat_session_shows_calls_and_keeps_them(small_tokenizer, tmp_path):
    import io

    from gptlab.chat.repl import ChatSession
    from gptlab.data.formats import load_conversations
    tok = small_tokenizer
    engine = Engine(ScriptedLM(tok, _script, block_size=512), tok)
    lines = iter(["What is 4821 * 3907?", f"/save {tmp_path / 'c.jsonl'}"])
    out = io.StringIO()

    def fake_input(prompt):
        item = next(lines, None)
        if item is None:
            raise EOFError
        return item
    s = ChatSession(engine, SamplingParams(max_new_tokens=60, temperature=0), input_fn=fake_input, out=out,
                    toolbox=builtin_toolbox("calculator"))
    assert s.run() == 0
    text = out.getvalue()
    assert 'Let me compute. \n[calculator {"expression": "4821 * 3907"} -> 18835647]\nThe answer is 18835647.' in text
    saved = load_conversations(tmp_path / "c.jsonl")[0]["messages"]
    assert [m["role"] for m in saved] == ["user", "assistant", "tool", "assistant"]
    assert saved[1]["tool_calls"] == [{"name": "calculator", "arguments": {"expression": "4821 * 3907"}}]


def test_chat_command_checks_tool_flags(tmp_path, capsys):
    assert "needs --index" in user_error(capsys, "chat", tmp_path, "--tools", "search")
    assert "unknown tool" in user_error(capsys, "chat", tmp_path, "--tools", "shell")


# ----- teaching it: the tool families and the with/without evaluation -------------------------------------
@pytest.fixture(scope="module")
def tool_curriculum(tmp_path_factory):
    from gptlab.cli import main
    out = tmp_path_factory.mktemp("curriculum")
    assert main(["data", "instruct", "--out", str(out), "--n-per-family", "60", "--no-shakespeare", "--tools"]) == 0
    return out


def test_tool_families_hold_out_documents_and_functions(tool_curriculum, small_tokenizer):
    from gptlab.data.formats import load_conversations, load_prompt_items
    out = tool_curriculum
    sft = load_conversations(out / "sft.jsonl")
    held = load_prompt_items(out / "tools_heldout.jsonl")
    fams = {c["family"] for c in sft}
    assert {"calc", "lookup", "funcs", "no_tool", "arithmetic"} <= fams and {i["family"] for i in held} >= {"calc", "lookup", "funcs"}
    sft_text = (out / "sft.jsonl").read_text(encoding="utf-8") + (out / "transcripts.txt").read_text(encoding="utf-8")
    train_docs = (out / "tool_docs" / "train" / "facts.jsonl").read_text(encoding="utf-8")
    held_docs = [json.loads(line) for line in (out / "tool_docs" / "heldout" / "facts.jsonl").read_text().splitlines()]
    assert held_docs
    for d in held_docs:   # a held-out document is nowhere in training
        assert d["title"] not in sft_text and d["title"] not in train_docs
    for it in held:
        if it["family"] == "funcs":   # nor is a held-out function, even as an unused neighbour
            assert f'"{it["call"]["name"]}"' not in sft_text
        if it["family"] == "calc":   # the answer is the sum or the product of the question's numbers
            a, b = (int(x) for x in re.findall(r"\d+", it["messages"][-1]["content"])[:2])
            assert int(it["answer"]) in (a + b, a * b) and max(a, b) >= 100
    for c in (c for c in sft if c["family"] in ("calc", "lookup", "funcs") and "tools" in c):
        ids, mask = render(small_tokenizer, c["messages"], c["tools"])
        at = next(i for i, m in enumerate(c["messages"]) if m["role"] == "tool")
        lo, hi = (len(render(small_tokenizer, c["messages"][:k], c["tools"])[0]) for k in (at, at + 1))
        assert not any(mask[lo:hi]) and all(mask[lo - 2:lo]) and mask[-1] == 1   # result untrained, call trained
    no_tool = [c for c in sft if c["family"] == "no_tool"]
    assert no_tool and all("tools" in c and len(c["messages"]) == 2 for c in no_tool)
    # the default curriculum has no tool family
    from gptlab.data.instruct import build_curriculum
    assert {i["family"] for i in build_curriculum(0, 20, works={})["sft"]} <= {
        "arithmetic", "strings", "translate", "multiturn", "decline"}


def test_eval_tools_scores_with_and_without(tool_curriculum, small_tokenizer, tmp_path):
    import re as re_

    from gptlab.data.formats import load_prompt_items
    from gptlab.evals.tools import evaluate_tools, format_table, summarize
    tok = small_tokenizer

    def script(text):
        q = text.rsplit("<|user_start|>", 1)[1].split("<|user_end|>")[0]
        if text.endswith("<|tool_end|>"):
            return "Result: " + text.rsplit("<|tool_start|>", 1)[1][: -len("<|tool_end|>")]
        if "Tools:" not in text:
            return "I am not sure."
        if "calculator(" in text and len(re_.findall(r"\d{3,}", q)) == 2:
            a, b = re_.findall(r"\d{3,}", q)
            op = "+" if any(w in q.lower() for w in ("+", "plus", "add", "sum", "加")) else "*"
            return '<|tool_start|>calculator {"expression": "%s %s %s"}<|tool_end|>' % (a, op, b)
        if "search(" in text:
            return '<|tool_start|>search {"query": "%s"}<|tool_end|>' % q.replace('"', "")
        return "Hmm."
    index = tmp_path / "held.index"
    build_index(tool_curriculum / "tool_docs" / "heldout", index)
    items = [i for i in load_prompt_items(tool_curriculum / "tools_heldout.jsonl") if i["family"] in ("calc", "lookup")
             and "tools" in i][:12]
    model = ScriptedLM(tok, script, block_size=4096)
    scores = evaluate_tools(model, tok, items, builtin_toolbox("calculator,search", str(index)))
    table = summarize(scores)
    assert table["calc"]["with"]["accuracy"] == 1.0 and table["calc"]["without"]["accuracy"] == 0.0
    assert table["lookup"]["with"]["accuracy"] >= 0.5 and table["lookup"]["without"]["accuracy"] == 0.0
    assert "| calc | 100.0%" in format_table(table)


def test_speedrun_tools_stage_is_optional(tmp_path):
    from gptlab.speedrun import Speedrun
    names = [s.name for s in Speedrun(tmp_path / "a", "test", None, "cpu", False).stages()]
    with_tools = Speedrun(tmp_path / "b", "test", None, "cpu", False, tools=True)
    assert "tools" not in names and [s.name for s in with_tools.stages()] == names[:-1] + ["tools", "report"]
    with pytest.raises(GptlabError, match="without --tools"):
        with_tools.stage_tools()
