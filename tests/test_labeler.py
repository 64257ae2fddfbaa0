import json
import random

import pytest

from gptlab.errors import GptlabError
from gptlab.label.labeler import pairwise_agreement, rank, score

ARITH = {"family": "arithmetic", "answer": "81", "reference": "23 + 58 = 81.",
         "messages": [{"role": "user", "content": "What is 23 + 58?"}]}
DECLINE = {"family": "decline", "answer": "I'm sorry, I can't answer that.",
           "reference": "I'm sorry, I can't answer that: there is no king of Mars.",
           "messages": [{"role": "user", "content": "What is the phone number of the king of Mars?"}]}

GOOD = "23 + 58 = 81."
WRONG = "23 + 58 = 80."
RAMBLING = ("Well, let me think about this for a while, because addition of two-digit numbers means we add "
            "the tens and then the ones and carry when needed, so in the end 23 + 58 = 81.")
REPETITIVE = "23 + 58 = 81. 23 + 58 = 81. 23 + 58 = 81. 23 + 58 = 81."
TRUNCATED = "23 + 58 = 81 and"


def test_correct_beats_wrong():
    assert rank(ARITH, [WRONG, GOOD]) == [1, 0]
    # Correctness outweighs style: a rambling right answer still beats a tidy wrong one.
    assert score(ARITH, RAMBLING) > score(ARITH, WRONG)
    assert score(ARITH, REPETITIVE) > score(ARITH, WRONG)


def test_decline_beats_made_up():
    made_up = "The phone number of the king of Mars is 555-0199."
    polite = "I'm sorry, I can't answer that: there is no king of Mars."
    rude = "That is a stupid question, I can't answer it."
    assert rank(DECLINE, [made_up, polite]) == [1, 0]
    assert rank(DECLINE, [made_up, rude, polite]) == [2, 1, 0]


def test_concise_beats_rambling_and_repetitive():
    assert rank(ARITH, [RAMBLING, GOOD]) == [1, 0]
    assert rank(ARITH, [REPETITIVE, GOOD]) == [1, 0]
    wrong_loop = "80. 80. 80. 80. 80. 80. 80. 80. 80. 80. 80. 80."
    assert score(ARITH, WRONG) > score(ARITH, wrong_loop + " 80.")


def test_non_empty_and_proper_ending():
    assert rank(ARITH, ["", WRONG]) == [1, 0]
    assert rank(ARITH, ["   ", "23 + 58 = 80 because"]) == [1, 0]
    assert score(ARITH, GOOD) > score(ARITH, "23 + 58 = 81")        # same answer, no full stop
    assert score(ARITH, "23 + 58 = 80.") > score(ARITH, "23 + 58 = 80 plus")


def test_full_ranking_and_ties_deterministic():
    responses = [TRUNCATED, "", WRONG, RAMBLING, GOOD, REPETITIVE]
    order = rank(ARITH, responses)
    assert order[0] == 4 and order[-1] == 1
    assert rank(ARITH, responses) == order
    assert rank(ARITH, ["same.", "same."]) == [0, 1]
    tied = ["b 1.", "a 1."]
    assert rank(ARITH, tied) == rank(ARITH, tied[::-1])[::-1]   # ties: by the text, not the position


def test_ties_carry_no_length_preference():
    """Two wrong answers tie; if the shorter one always won, a reward model trained on the rankings
    would learn "shorter is better" and PPO would cut answers short."""
    rng = random.Random(0)
    shorter_first = 0
    for _ in range(400):
        a, b = rng.randint(0, 99), rng.randint(1000, 99999)         # both wrong for 23 + 58
        short, long = f"23 + 58 = {a}.", f"23 + 58 = {b}."
        shorter_first += rank(ARITH, [long, short])[0] == 1
    assert 0.4 < shorter_first / 400 < 0.6


@pytest.mark.parametrize("k, noise", [(2, 0.27), (4, 0.27), (9, 0.27), (4, 0.1), (4, 0.5)])
def test_noise_rate(k, noise):
    responses = [f"23 + 58 = {81 + i}." for i in range(k)]   # distinct scores: a strict clean order
    clean = rank(ARITH, responses)
    rng = random.Random(k)
    agree = [pairwise_agreement(clean, rank(ARITH, responses, noise=noise, rng=rng)) for _ in range(1500)]
    assert abs(sum(agree) / len(agree) - (1 - noise)) < 0.03


def test_noise_reproducible_with_seeded_rng():
    responses = [GOOD, WRONG, RAMBLING, ""]
    a = [rank(ARITH, responses, 0.3, random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2] and sorted(a[0]) == [0, 1, 2, 3]
    with pytest.raises(GptlabError):
        rank(ARITH, responses, noise=1.5)


def test_curriculum_references_rank_first():
    """The demonstration beats corrupted versions of itself for every family."""
    from gptlab.data.instruct import build_curriculum
    cur = build_curriculum(seed=0, n_per_family=40, works={})
    for item in cur["prompts"]:
        ref = item["reference"]
        bad = [ref + " " + ref + " " + ref, ref[: len(ref) // 2], "", "I don't know, sorry."]
        if item["family"] == "decline":
            bad[-1] = "The answer is 42."
        assert rank(item, bad + [ref])[0] == len(bad), json.dumps(item, ensure_ascii=False)


# ----- gptlab label: terminal UI, resume, CLI ----------------------------------------------------------
from gptlab.data.formats import load_preferences  # noqa: E402
from gptlab.io import iter_jsonl  # noqa: E402
from gptlab.label.commands import label_rankings, parse_order, prompt_key  # noqa: E402


def arith_item(i):
    a, b = 10 + i, 20 + i
    return {"family": "arithmetic", "answer": str(a + b), "id": f"a{i}", "reference": f"{a} + {b} = {a + b}.",
            "messages": [{"role": "user", "content": f"What is {a} + {b}?"}]}


def fake_responses(messages, k):
    """K fixed, distinct responses per prompt: the right one, wrong ones, an empty one."""
    q = messages[-1]["content"][8:-1]
    a, b = (int(x) for x in q.split(" + "))
    out = [f"{q} = {a + b + 1}.", f"{q} = {a + b}.", "", f"{q} = {a + b}. {q} = {a + b}. {q} = {a + b}."]
    return out[:k]


def rows(path):
    return [r for _, r in iter_jsonl(path)]


@pytest.mark.parametrize("text, k, want", [
    ("2 1 4 3", 4, [1, 0, 3, 2]), ("2,1,4,3", 4, [1, 0, 3, 2]), ("2143", 4, [1, 0, 3, 2]),
    ("2 1 4", 4, [1, 0, 3, 2]), ("1 2", 2, [0, 1]), ("2", 2, [1, 0]),
])
def test_parse_order(text, k, want):
    assert parse_order(text, k) == want


@pytest.mark.parametrize("text", ["1 1 2 3", "0 1 2 3", "1 2 3 5", "a b c d", "1 2", ""])
def test_parse_order_rejects(text):
    with pytest.raises(ValueError):
        parse_order(text, 4)


def test_terminal_ui(tmp_path, monkeypatch):
    answers = iter(["2 1 4 3", "nonsense", "1 1 2 3", "4 3 2 1", "s", "q"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    shown = []
    out = tmp_path / "r.jsonl"
    stats = label_rankings([arith_item(i) for i in range(5)], fake_responses, 4, out, show=shown.append)
    assert stats == {"total": 5, "already": 0, "labelled": 2, "skipped": 1, "quit": True}
    got = rows(out)
    assert [r["ranking"] for r in got] == [[1, 0, 3, 2], [3, 2, 1, 0]]
    assert got[0]["labeler"] == "human" and got[0]["id"] == "a0" and got[0]["prompt_index"] == 0
    assert any("try again" in s for s in shown) and any("(empty)" in s for s in shown)
    assert len(load_preferences(out)) == 2                  # the output is a valid rankings file
    # Resume: the skipped and unanswered prompts come back, the answered ones do not.
    answers = iter(["1 2 3 4", "1 2 3 4", "1 2 3 4"])
    stats = label_rankings([arith_item(i) for i in range(5)], fake_responses, 4, out, show=shown.append)
    assert stats["already"] == 2 and stats["labelled"] == 3 and not stats["quit"]
    assert sorted(r["prompt_index"] for r in rows(out)) == [0, 1, 2, 3, 4]


def test_eof_quits(tmp_path):
    def eof(prompt=""):
        raise EOFError
    stats = label_rankings([arith_item(0)], fake_responses, 2, tmp_path / "r.jsonl", ask=eof, show=lambda s: None)
    assert stats["quit"] and stats["labelled"] == 0


def test_auto_ranks_correct_first(tmp_path):
    out = tmp_path / "r.jsonl"
    label_rankings([arith_item(i) for i in range(3)], fake_responses, 4, out, auto=True)
    for r in rows(out):
        assert r["ranking"] == [1, 3, 0, 2] and r["labeler"] == "auto" and r["noise"] == 0.0
        assert r["ties"] == []


def test_auto_marks_ties(tmp_path):
    """Two different wrong answers score the same: the row lists them as tied (no comparison)."""
    out = tmp_path / "r.jsonl"

    def two_wrong(messages, k):
        q = messages[-1]["content"][8:-1]
        a, b = (int(x) for x in q.split(" + "))
        return [f"{q} = {a + b + 1}.", f"{q} = {a + b}.", f"{q} = {a + b + 2}."]
    label_rankings([arith_item(0)], two_wrong, 3, out, auto=True)
    (row,) = rows(out)
    assert row["ties"] == [[0, 2]] and row["ranking"][0] == 1
    (r,) = load_preferences(out)
    assert r.ties == {frozenset((0, 2))}


def test_auto_needs_item_info(tmp_path):
    with pytest.raises(GptlabError, match="--auto needs prompts"):
        label_rankings([[{"role": "user", "content": "hi"}]], fake_responses, 2, tmp_path / "r.jsonl", auto=True)


def test_resume_after_crash_with_torn_line(tmp_path):
    items = [arith_item(i) for i in range(12)]
    reference = tmp_path / "ref.jsonl"
    label_rankings(items, fake_responses, 4, reference, auto=True, noise=0.3, seed=5)

    out = tmp_path / "r.jsonl"
    calls = {"n": 0}

    def crashing(messages, k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt   # the process dies while sampling the 6th prompt
        return fake_responses(messages, k)

    with pytest.raises(KeyboardInterrupt):
        label_rankings(items, crashing, 4, out, auto=True, noise=0.3, seed=5)
    assert len(rows(out)) == 5
    with open(out, "a", encoding="utf-8") as f:      # and a write was torn half-way
        f.write('{"prompt": [{"role": "user", "content": "What is 1')
    stats = label_rankings(items, fake_responses, 4, out, auto=True, noise=0.3, seed=5)
    assert stats["already"] == 5 and stats["labelled"] == 7
    got = rows(out)                                    # parses: the fragment is gone
    keys = [r["key"] for r in got]
    assert len(keys) == len(set(keys)) == 12
    assert keys == [prompt_key(i, it["messages"]) for i, it in enumerate(items)]
    assert got == rows(reference)                     # identical to a run that never crashed
    assert stats == {**stats, "total": 12}
    # Rerunning a finished job does nothing.
    assert label_rankings(items, fake_responses, 4, out, auto=True, noise=0.3, seed=5)["labelled"] == 0


def test_whole_last_record_without_newline_is_kept(tmp_path):
    items = [arith_item(i) for i in range(3)]
    out = tmp_path / "r.jsonl"
    label_rankings(items[:1], fake_responses, 2, out, auto=True)
    out.write_bytes(out.read_bytes().rstrip(b"\n"))
    label_rankings(items, fake_responses, 2, out, auto=True)
    assert [r["prompt_index"] for r in rows(out)] == [0, 1, 2]


def test_edited_prompt_is_relabelled(tmp_path):
    out = tmp_path / "r.jsonl"
    label_rankings([arith_item(0), arith_item(1)], fake_responses, 2, out, auto=True)
    stats = label_rankings([arith_item(0), arith_item(7)], fake_responses, 2, out, auto=True)
    assert stats["already"] == 1 and stats["labelled"] == 1


def _cli(argv, capsys):
    from gptlab.cli import main
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def test_cli_bad_input(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"prompt": "hi"}\n')
    base = ["label", "--policy", str(run), "--out", str(tmp_path / "o.jsonl")]
    cases = [
        (base + ["--prompts", str(tmp_path / "missing.jsonl")], "no such file"),
        (base + ["--prompts", str(plain), "-k", "12"], "-k must be between 2 and 9"),
        (base + ["--prompts", str(plain), "--auto"], "--auto needs prompts"),
        (base + ["--prompts", str(plain), "--noise", "0.2"], "--noise only applies with --auto"),
        (base + ["--prompts", str(plain), "--temperature", "0"], "--temperature"),
        (["label", "--policy", str(tmp_path), "--out", "o.jsonl", "--prompts", str(plain)], "not a run folder"),
        # --out where nothing can be written: said before the model loads (this run has no weights)
        (["label", "--policy", str(run), "--out", str(plain / "o.jsonl"), "--prompts", str(plain)], "cannot write"),
    ]
    for argv, words in cases:
        code, err = _cli(argv, capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith("error:") and words in err[0], (argv, err)
