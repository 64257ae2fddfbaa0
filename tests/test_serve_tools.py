"""OpenAI function calling and server-side tools, driven with the official ``openai`` client against a
live server whose model is scripted (it calls a function on cue, then reads the result back)."""
import json

import openai
import pytest
from scripted_lm import ScriptedLM
from test_serve import LiveServer, page_client, sse_events

from gptlab.generate.engine import Engine
from gptlab.generate.tool_loop import ToolTurn
from gptlab.serve.app import create_app
from gptlab.serve.backend import Backend
from gptlab.serve.store import Store
from gptlab.tools import builtin_toolbox
from gptlab.tokenizer.chat_template import render_prompt
from gptlab.tools.search import build_index

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def _script(text: str) -> str:
    last_user = text.rsplit("<|user_start|>", 1)[1].split("<|user_end|>")[0]
    if text.endswith("<|tool_end|>"):
        result = text.rsplit("<|tool_start|>", 1)[1][: -len("<|tool_end|>")]
        return f"It is {result} in Paris." if "weather" in last_user else f"Found: {result}"
    if "Tools:" not in text:
        return "No tools."
    if "weather" in last_user and "get_weather(" in text:
        return 'Let me look. <|tool_start|>get_weather {"city": "Paris"}<|tool_end|>'
    if "search(" in text:
        return '<|tool_start|>search {"query": "%s"}<|tool_end|>' % last_user
    return "Hello."


@pytest.fixture(scope="module")
def live(small_tokenizer, tmp_path_factory):
    docs = tmp_path_factory.mktemp("docs")
    (docs / "z.md").write_text("The capital of Zorbland is Quellport.\n\nBlue marmalade is made in Vell.\n",
                               encoding="utf-8")
    index = docs.parent / "docs.index"
    build_index(docs, index)
    servers, stores = [], []
    for toolbox in (None, builtin_toolbox("search", str(index))):
        engine = Engine(ScriptedLM(small_tokenizer, _script, block_size=1024), small_tokenizer)
        stores.append(Store(docs.parent / f"chat{len(stores)}.sqlite3"))
        servers.append(LiveServer(create_app(Backend(engine, "scripted", max_batch=4, toolbox=toolbox),
                                             store=stores[-1])))
    with servers[0] as plain, servers[1] as searching:
        yield plain, searching
    for st in stores:
        st.close()


ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_function_call_round_trip(live):
    client = live[0].client()
    r = client.chat.completions.create(model="scripted", messages=ASK, tools=[WEATHER], temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.message.content == "Let me look."
    # Usage counts what the engine was given and made (the prompt as fitted, every generated id).
    tok = live[0].server.config.app.state.backend.tok
    assert r.usage.prompt_tokens == len(render_prompt(tok, ASK, [WEATHER["function"]]))
    assert r.usage.completion_tokens >= len(tok.encode("Let me look."))
    follow = ASK + [choice.message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    r2 = client.chat.completions.create(model="scripted", messages=follow, tools=[WEATHER], temperature=0)
    assert r2.choices[0].finish_reason == "stop" and r2.choices[0].message.content == "It is sunny in Paris."
    assert r2.choices[0].message.tool_calls is None
    # "none": the model is not shown the tools and cannot call them
    r3 = client.chat.completions.create(model="scripted", messages=ASK, tools=[WEATHER], tool_choice="none")
    assert r3.choices[0].message.content == "No tools." and r3.choices[0].finish_reason == "stop"


def test_function_call_streamed(live):
    client = live[0].client()
    chunks = list(client.chat.completions.create(model="scripted", messages=ASK, tools=[WEATHER], stream=True,
                                                 temperature=0))
    deltas = [c.choices[0].delta for c in chunks]
    assert deltas[0].role == "assistant"
    text = "".join(d.content or "" for d in deltas)
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather" and calls[0].index == 0
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls" and text.strip() == "Let me look."
    follow = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": calls[0].id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "raining"}]
    chunks = list(client.chat.completions.create(model="scripted", messages=follow, tools=[WEATHER], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "It is raining in Paris."
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_bad_tool_requests_are_openai_400s(live):
    client = live[0].client()
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    cases = [
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "strang"}}}]), "tools[0].function"),
        (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), "tools[0].function"),
        (dict(tools=[{"type": "retrieval"}]), "tools[0]"),
        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tools=[WEATHER], tool_choice="sometimes"), "tool_choice"),
        (dict(tool_choice="auto"), "tool_choice"),
        (dict(tools=[WEATHER], n=2), "n"),
        (dict(messages=ASK + [{"role": "tool", "tool_call_id": "call_404", "content": "x"}], tools=[WEATHER]),
         "messages[1].tool_call_id"),
        (dict(messages=ASK + [{"role": "assistant", "content": None, "tool_calls": [
            {**call, "function": {"name": "get_weather", "arguments": "{city: Oslo"}}]}], tools=[WEATHER]),
         "messages[1].tool_calls[0].function.arguments"),
        (dict(messages=ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                              {"role": "tool", "content": "x"}], tools=[WEATHER]), "messages[2].tool_call_id"),
    ]
    for kw, param in cases:
        kw = {"model": "scripted", "messages": ASK, **kw}
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**kw)
        assert e.value.status_code == 400 and e.value.body["param"] == param, (kw, e.value.body)
        assert e.value.body["type"] == "invalid_request_error"


def test_server_side_search(live):
    client = live[1].client()
    r = client.chat.completions.create(model="scripted", temperature=0,
                                       messages=[{"role": "user", "content": "What is the capital of Zorbland?"}])
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop" and msg.tool_calls is None
    assert msg.content == "Found: [z.md] The capital of Zorbland is Quellport. Blue marmalade is made in Vell."
    runs = msg.model_dump()["tool_runs"]
    assert runs[0]["name"] == "search" and "Quellport" in runs[0]["result"]
    # a client function beside the server's own tools; a name clash is refused
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="scripted", messages=ASK, tools=[
            {"type": "function", "function": {"name": "search"}}])
    chunks = list(client.chat.completions.create(model="scripted", stream=True, messages=[
        {"role": "user", "content": "Where is blue marmalade made?"}]))
    assert "Vell" in "".join(c.choices[0].delta.content or "" for c in chunks)


def test_forced_calls_open_the_reply(small_tokenizer):
    tok = small_tokenizer
    tools = [WEATHER["function"]]
    turn = ToolTurn(tok, ASK, tools, None, force="get_weather")
    ids = turn.step().ids
    assert tok.decode(ids).endswith("<|assistant_start|><|tool_start|>get_weather ")
    turn.feed(tok.encode('{"city": "Rome"}'), '{"city": "Rome"}', "stop", tok.special_id("<|tool_end|>"))
    assert turn.pending.name == "get_weather" and turn.pending.arguments == {"city": "Rome"}
    assert turn.finish_reason == "tool_calls"
    assert tok.decode(ToolTurn(tok, ASK, tools, None, force=True).step().ids).endswith("<|tool_start|>")


def test_serve_checks_tool_flags_before_loading(tmp_path, capsys):
    from conftest import user_error
    assert "needs --index" in user_error(capsys, "serve", tmp_path, "--port", "0", "--tools", "search")
    assert "no such file" in user_error(capsys, "serve", tmp_path, "--port", "0", "--tools", "search",
                                        "--index", tmp_path / "none.index")


def test_web_page_shows_and_keeps_tool_runs(live):
    http = page_client(live[1])
    cid = http.post("/api/conversations", json={}).json()["id"]
    with http.stream("POST", f"/api/conversations/{cid}/messages",
                     json={"content": "What is the capital of Zorbland?", "temperature": 0}) as r:
        events = sse_events(r)
    tool = next(e for e in events if e["type"] == "tool")
    assert tool["name"] == "search" and tool["arguments"] == {"query": "What is the capital of Zorbland?"}
    assert "Quellport" in tool["result"] and events[-1]["message"]["tool_runs"][0]["result"] == tool["result"]
    shown = http.get(f"/api/conversations/{cid}").json()["messages"]
    assert shown[-1]["tool_runs"] == [{k: tool[k] for k in ("name", "arguments", "result")}]
    assert "Found: [z.md] The capital" in shown[-1]["content"] and "tool_runs" not in shown[0]
    script = http.get("/static/app.js").text   # a <details> without "open": collapsed until clicked
    assert 'el("details", "tool-run")' in script and ".open" not in script.split("function addToolRun")[1][:400]
