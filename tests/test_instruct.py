import argparse
import json

import pytest

from gptlab.data.formats import load_conversations, load_prompt_items
from gptlab.data.instruct import FAMILIES, add_instruct_parser, build_curriculum, check_answer
from gptlab.errors import GptlabError

# Tiny stand-ins for the corpus, in the Gutenberg layout iter_speeches reads.
WORKS = {
    "Hamlet": "\n\nHAMLET.\nTo be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
              "The slings and arrows of outrageous fortune,\n\nOPHELIA.\nGood my lord, how does your honour "
              "for this many a day?\nI humbly thank you; well, well, well.\n",
    "Macbeth": "\n\nFIRST WITCH.\nWhen shall we three meet again in thunder?\nIn thunder, lightning, or in rain "
               "again?\n\nMACBETH.\nSo foul and fair a day I have not seen.\nIs this a dagger which I see "
               "before me,\n",
}


def user_texts(item):
    return "|".join(m["content"] for m in item["messages"] if m["role"] == "user")


@pytest.fixture(scope="module")
def cur():
    return build_curriculum(seed=3, n_per_family=60, works=WORKS)


def test_deterministic_for_a_seed(cur):
    assert build_curriculum(seed=3, n_per_family=60, works=WORKS) == cur
    other = build_curriculum(seed=4, n_per_family=60, works=WORKS)
    assert other != cur


def test_every_family_in_every_split(cur):
    for split, items in cur.items():
        assert {i["family"] for i in items} == set(FAMILIES), split


def test_item_shape(cur):
    for item in cur["sft"]:
        assert set(item) >= {"family", "messages", "answer", "id"}
        assert item["messages"][-1]["role"] == "assistant"
    for split in ("prompts", "heldout"):
        for item in cur[split]:
            assert item["messages"][-1]["role"] == "user" and item["reference"]


def test_heldout_disjoint_from_other_splits(cur):
    ids = {s: {i["id"] for i in items} for s, items in cur.items()}
    assert not ids["heldout"] & (ids["sft"] | ids["prompts"])
    assert not ids["sft"] & ids["prompts"]
    # Stronger: no held-out question text appears anywhere else (any wording of the same turn).
    held = {user_texts(i) for i in cur["heldout"]}
    firsts = {i["messages"][0]["content"] if i["messages"][0]["role"] != "system" else i["messages"][1]["content"]
              for s in ("sft", "prompts") for i in cur[s]}
    assert not held & {user_texts(i) for s in ("sft", "prompts") for i in cur[s]}
    assert not {h.split("|")[0] for h in held if "|" not in h} & firsts


def test_heldout_stable_across_seeds_and_sizes():
    """A held-out problem is held out whatever the seed: another seed's training data never contains it."""
    a = build_curriculum(seed=1, n_per_family=300, works={})
    b = build_curriculum(seed=2, n_per_family=300, works={})
    held_a = {i["id"] for i in a["heldout"]}
    train_b = {i["id"] for s in ("sft", "prompts") for i in b[s]}
    assert held_a and not held_a & train_b


def test_reference_answers_check(cur):
    for item in cur["sft"]:
        assert check_answer(item, item["messages"][-1]["content"]), item
    for item in cur["prompts"] + cur["heldout"]:
        assert check_answer(item, item["reference"]), item


def test_shakespeare_optional():
    cur = build_curriculum(seed=0, n_per_family=20, works={})
    assert not any(i["family"] == "shakespeare" for s in cur.values() for i in s)


def test_shakespeare_items():
    cur = build_curriculum(seed=0, n_per_family=40, works=WORKS)
    items = [i for s in cur.values() for i in s if i["family"] == "shakespeare"]
    answers = {i["answer"] for i in items}
    assert answers & {"Hamlet", "Macbeth"}          # which play
    assert answers & {"Ophelia", "First Witch"}     # who speaks (names title-cased)


ARITH = {"family": "arithmetic", "answer": "81", "messages": [{"role": "user", "content": "What is 23 + 58?"}]}
UPPER = {"family": "strings", "answer": "GOOD DAY", "messages": [{"role": "user", "content": "Write 'good day' in uppercase."}]}
REV = {"family": "strings", "answer": "elppa", "messages": [{"role": "user", "content": "Reverse the word 'apple'."}]}
ZH = {"family": "translate", "answer": "水", "messages": [{"role": "user", "content": "Translate 'water' into Chinese."}]}
LINE = {"family": "shakespeare", "answer": "be a perfect man",
        "messages": [{"role": "user", "content": 'Complete this line from Two Gentlemen of Verona: "And how he cannot ..."'}]}
DECLINE = {"family": "decline", "answer": "I'm sorry, I can't answer that.",
           "messages": [{"role": "user", "content": "What is the phone number of the king of Mars?"}]}
# Items that carry their problem (the exam's): a reply restating another question is wrong even
# when its final number or letter happens to be the answer.
COUNT = {"family": "strings", "answer": "1", "problem": "count:b:subject"}
REV_P = {"family": "strings", "answer": "erohs", "problem": "rev:shore"}
SUM_P = {"family": "arithmetic", "answer": "80", "problem": "arith:51 + 29"}
DIFF_P = {"family": "arithmetic", "answer": "16", "problem": "arith:61 - 45"}


@pytest.mark.parametrize("item, text, ok", [
    (ARITH, "23 + 58 = 81.", True),
    (ARITH, "81", True),
    (ARITH, "The answer is 81!", True),
    (ARITH, "23 + 58 = 80.", False),
    (ARITH, "23 + 58 = 81. 23 + 58 =", False),        # truncated: the final answer is not 81
    (ARITH, "23 + 58 = 811.", False),
    (ARITH, "", False),
    (ARITH, "I'm sorry, I can't answer that.", False),
    (UPPER, "'good day' in uppercase is 'GOOD DAY'.", True),
    (UPPER, "'good day' in uppercase is 'Good Day'.", False),
    (REV, "'apple' reversed is 'elppa'.", True),
    (REV, "'apple' reversed is 'Elppa'", True),
    (REV, "'apple' reversed is 'elpap'.", False),
    (REV, "'apple' reversed is 'xelppa'.", False),
    (ZH, "'water' in Chinese is 水.", True),
    (ZH, "'water' in Chinese is 冰水.", False),
    (LINE, 'The full line is: "And how he cannot be a perfect man,"', True),   # "cannot" quoted, not a refusal
    (LINE, "I cannot be a perfect man", False),
    (DECLINE, "I'm sorry, I can't answer that: there is no king of Mars.", True),
    (DECLINE, "I cannot know that.", True),
    (DECLINE, "The phone number of the king of Mars is 555-0199.", False),
    (DECLINE, "What a stupid question, I can't answer it.", False),
    (COUNT, "'subject' contains the letter 'b' 1 time.", True),
    (COUNT, "'supper' contains the letter 's' 1 time.", False),   # right number, another question
    (COUNT, "It's there 1 time.", True),                            # an apostrophe is no quote
    (REV_P, "'shore' reversed is 'erohs'.", True),
    (REV_P, "'erohs'", True),
    (REV_P, "'short' reversed is 'erohs'.", False),
    (SUM_P, "29 + 51 = 80.", True),
    (SUM_P, "The answer is 80.", True),
    (SUM_P, "51 * 29 = 80.", False),
    (SUM_P, "50 + 30 = 80.", False),
    (DIFF_P, "61-45=16", True),
    (DIFF_P, "45 - 61 = 16.", False),
])
def test_check_answer(item, text, ok):
    assert check_answer(item, text) is ok


def test_check_answer_needs_item_info():
    with pytest.raises(GptlabError):
        check_answer({"messages": []}, "x")


def test_command_writes_loadable_files(tmp_path):
    parser = argparse.ArgumentParser()
    add_instruct_parser(parser.add_subparsers())
    args = parser.parse_args(["instruct", "--seed", "5", "--n-per-family", "30", "--out", str(tmp_path),
                              "--no-shakespeare"])
    assert args.func(args) == 0
    sft = load_conversations(tmp_path / "sft.jsonl")
    prompts = load_prompt_items(tmp_path / "prompts.jsonl")
    held = load_prompt_items(tmp_path / "heldout.jsonl")
    assert sft and prompts and held
    assert all("family" in p and "answer" in p for p in prompts)
    counts = json.loads((tmp_path / "curriculum.json").read_text())["counts"]
    assert sum(counts["sft"].values()) == len(sft)


def test_command_bad_input(tmp_path):
    parser = argparse.ArgumentParser()
    add_instruct_parser(parser.add_subparsers())
    args = parser.parse_args(["instruct", "--n-per-family", "0", "--out", str(tmp_path)])
    with pytest.raises(GptlabError):
        args.func(args)


def test_cli_exit_code(tmp_path, capsys):
    from gptlab.cli import main
    assert main(["data", "instruct", "--n-per-family", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
