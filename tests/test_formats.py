import json
from itertools import combinations

import pytest

from gptlab.data.formats import (Ranking, detect_format, expand_pairs, load_conversations, load_preferences,
                                 load_prompt_items, load_prompts)
from gptlab.errors import GptlabError

U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello!"}
S = {"role": "system", "content": "Be brief."}


def write(tmp_path, rows, name="f.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def error_of(fn, path):
    with pytest.raises(GptlabError) as e:
        fn(path)
    return str(e.value)


def test_conversations_ok_and_metadata_kept(tmp_path):
    path = write(tmp_path, [{"messages": [S, U, A], "id": "x"}, {"messages": [U, A, U, A]}])
    convs = load_conversations(path)
    assert convs[0]["id"] == "x" and convs[0]["messages"] == [S, U, A]
    assert detect_format(path) == "conversations"


@pytest.mark.parametrize("bad, words", [
    ({"messages": [U]}, "no assistant turn"),
    ({"messages": [U, S, A]}, "system message may only come first"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "role 'bot'"),
    ({"messages": [{"role": "user", "content": 3}, A]}, "string \"content\""),
    ({"messages": []}, "non-empty list"),
    ({"text": "hello"}, "missing \"messages\""),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
])
def test_conversation_errors_name_file_and_line(tmp_path, bad, words):
    path = write(tmp_path, [{"messages": [U, A]}, {"messages": [U, A]}, bad])
    msg = error_of(load_conversations, path)
    assert f"{path}:3" in msg and words in msg


def test_whole_file_validated_before_returning(tmp_path):
    rows = [{"messages": [U, A]}] * 500 + [{"messages": [U]}]
    msg = error_of(load_conversations, write(tmp_path, rows))
    assert ":501:" in msg


def test_empty_file(tmp_path):
    assert "empty" in error_of(load_conversations, write(tmp_path, []))


def test_prompts_string_or_messages(tmp_path):
    path = write(tmp_path, [{"prompt": "What is 2 + 2?", "family": "arithmetic", "answer": "4"},
                            {"messages": [S, U, A, U]}])
    assert load_prompts(path) == [[{"role": "user", "content": "What is 2 + 2?"}], [S, U, A, U]]
    items = load_prompt_items(path)
    assert items[0]["family"] == "arithmetic" and items[0]["answer"] == "4" and "prompt" not in items[0]
    assert detect_format(path) == "prompts"


@pytest.mark.parametrize("bad, words", [
    ({"messages": [U, A]}, "last message must be a user turn"),
    ({"prompt": ""}, "empty"),
    ({"prompt": 5}, "string or a messages list"),
    ({"question": "hi"}, "needs \"prompt\""),
])
def test_prompt_errors(tmp_path, bad, words):
    path = write(tmp_path, [{"prompt": "ok"}, bad])
    msg = error_of(load_prompts, path)
    assert f"{path}:2" in msg and words in msg


def test_rankings_and_pairs_mixed(tmp_path):
    path = write(tmp_path, [
        {"prompt": "Q", "responses": ["a", "b", "c"], "ranking": [2, 0, 1], "labeler": "auto"},
        {"prompt": [U], "chosen": "good", "rejected": "bad"},
        {"prompt": [U], "chosen": [{"role": "assistant", "content": "g"}],
         "rejected": [{"role": "assistant", "content": "b"}]},
    ])
    prefs = load_preferences(path)
    assert prefs[0] == Ranking([{"role": "user", "content": "Q"}], ["a", "b", "c"], [2, 0, 1], {"labeler": "auto"})
    assert prefs[1].responses == ["good", "bad"] and prefs[1].ranking == [0, 1]
    assert prefs[2].responses == ["g", "b"]
    assert detect_format(path) == "rankings"
    assert detect_format(write(tmp_path, [{"prompt": "Q", "chosen": "a", "rejected": "b"}], "p.jsonl")) == "pairs"


@pytest.mark.parametrize("bad, words", [
    ({"prompt": "Q", "responses": ["a"], "ranking": [0]}, "between 2 and 9"),
    ({"prompt": "Q", "responses": ["a"] * 10, "ranking": list(range(10))}, "between 2 and 9"),
    ({"prompt": "Q", "responses": ["a", "b"], "ranking": [0, 0]}, "each response index 0..1 once"),
    ({"prompt": "Q", "responses": ["a", "b"], "ranking": [0, 2]}, "each response index"),
    ({"prompt": "Q", "responses": ["a", "b"], "ranking": [1]}, "each response index"),
    ({"prompt": "Q", "responses": ["a", "b"], "ranking": [True, False]}, "each response index"),
    ({"prompt": "Q", "responses": ["a", 2], "ranking": [0, 1]}, "list of strings"),
    ({"prompt": "Q", "responses": ["a", "b"], "ranking": [0, 1], "ties": [[0, 2]]}, "\"ties\" must be"),
    ({"prompt": "Q", "responses": ["a", "b"], "ranking": [0, 1], "ties": [[1, 1]]}, "\"ties\" must be"),
    ({"prompt": "Q", "responses": ["a", "b"], "ranking": [0, 1], "ties": [0, 1]}, "\"ties\" must be"),
    ({"responses": ["a", "b"], "ranking": [0, 1]}, "missing \"prompt\""),
    ({"prompt": "Q", "chosen": "a"}, "missing \"rejected\""),
    ({"prompt": "Q", "chosen": 1, "rejected": "b"}, "\"chosen\" must be a string"),
    ({"prompt": [U, A], "chosen": "a", "rejected": "b"}, "last message must be a user turn"),
    ({"prompt": "Q", "answer": "a"}, "not a preference record"),
])
def test_preference_errors(tmp_path, bad, words):
    path = write(tmp_path, [{"prompt": "Q", "chosen": "a", "rejected": "b"}, bad])
    msg = error_of(load_preferences, path)
    assert f"{path}:2" in msg and words in msg


def test_detect_format_unknown(tmp_path):
    assert "not a known format" in error_of(detect_format, write(tmp_path, [{"x": 1}]))


@pytest.mark.parametrize("k", range(2, 10))
def test_expand_pairs_all_comparisons(k):
    import random
    order = list(range(k))
    random.Random(k).shuffle(order)
    pairs = expand_pairs(Ranking([U], ["r"] * k, order))
    assert len(pairs) == len(list(combinations(range(k), 2)))
    assert len(set(pairs)) == len(pairs)
    pos = {x: i for i, x in enumerate(order)}
    assert all(pos[w] < pos[l] for w, l in pairs)   # the winner is always ranked higher
    assert {frozenset(p) for p in pairs} == {frozenset(p) for p in combinations(range(k), 2)}


def test_expand_pairs_example():
    assert expand_pairs([2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]
