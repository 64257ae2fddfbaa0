"""The exam: person-phrased questions whose wordings the curriculum never uses, with checkable answers."""
import json
import random
import re

import pytest

from gptlab.data import phrasing
from gptlab.data.instruct import build_curriculum, check_answer
from gptlab.evals import exam


def _skeleton(template: str) -> str:
    """A template with its slots blanked and case/punctuation dropped: what 'the same wording' means."""
    t = re.sub(r"\{\w+\}", "#", template.lower())
    return re.sub(r"[^\w#\u4e00-\u9fff]+", " ", t).strip()


def test_exam_wordings_never_occur_in_the_curriculum():
    trained = {_skeleton(t) for name in dir(phrasing) for v in [getattr(phrasing, name)]
               if isinstance(v, tuple) for t in v if isinstance(t, str)}
    trained |= {_skeleton(t) for v in phrasing.FOLLOW.values() for t in v}
    asked = [t for v in (exam._ADD, exam._SUB, exam._REVERSE, exam._UPPER, exam._COUNT, exam._FIRST, exam._TO_ZH,
                         exam._TO_EN) for t in v]
    asked += [t for v in exam._FOLLOW.values() for t in v]
    assert len(asked) > 40
    clash = [t for t in asked if _skeleton(t) in trained]
    assert not clash, clash
    decline_trained = {_skeleton(i["messages"][-2]["content"]) for i in build_curriculum(0, 300, works={})["sft"]
                       if i["family"] == "decline"}
    assert not [q for q in exam._DECLINE if _skeleton(q) in decline_trained]


def test_exam_is_deterministic_balanced_and_its_answers_check():
    items = exam.build_exam(12, seed=3)
    assert items == exam.build_exam(12, seed=3)
    assert items != exam.build_exam(12, seed=4)
    assert [sum(i["family"] == f for i in items) for f in exam.FAMILIES] == [12] * 5
    for it in items:
        a = it["answer"]
        reply = "I'm sorry, I can't answer that." if it["family"] == "decline" else f"The answer is '{a}'."
        assert check_answer(it, reply), it
        if it["family"] != "decline":
            assert not check_answer(it, "I'm sorry, I can't answer that.")
    # The multi-turn follow-up really needs the first answer: its value follows from it.
    for it in items:
        if it["family"] == "multiturn":
            first = int(it["messages"][1]["content"].split("= ")[1].rstrip("."))
            assert int(it["answer"]) in {2 * first, first // 2} or abs(int(it["answer"]) - first) <= 20


def test_exam_problems_are_held_out_of_every_training_split():
    """Arithmetic and string problems are in the curriculum's held-out bucket: the canonical reply that
    starts every training answer ("59 + 63 = 122.", "'shore' reversed is ...") never names them."""
    from gptlab.data.instruct import HELDOUT_FRACTION, _bucket
    cur = build_curriculum(0, 3000, works={})
    replies = [i["messages"][-1]["content"] if s == "sft" else i["reference"] for s in ("sft", "prompts")
               for i in cur[s] if i["family"] in ("arithmetic", "multiturn")]
    items = [i for i in exam.build_exam(40) if "problem" in i]
    assert len(items) == 120
    for it in items:
        assert _bucket(it["problem"]) < HELDOUT_FRACTION
    canon = {it["problem"].split(":", 1)[1] + " =" for it in items if it["problem"].startswith("arith:")}
    assert not [r for r in replies if r.split(" = ")[0] + " =" in canon]


def test_summary_and_table():
    items = exam.build_exam(2)
    replies = [("I'm sorry, I can't answer that." if i["family"] == "decline" else "no idea") for i in items]
    s = exam.summarise(items, replies)
    assert s["per_family"]["decline"] == 1.0 and s["per_family"]["arithmetic"] == 0.0
    assert s["mean_family_accuracy"] == pytest.approx(0.2) and s["min_family_accuracy"] == 0.0
    assert "| m | 0% | 0% | 0% | 0% | 100% | **20.0%** |" in exam.format_table({"m": s})
    assert s["restated"] == {"arithmetic": 0.0, "strings": 0.0}


def test_restated_counts_replies_that_copy_the_question_whatever_their_answer():
    from gptlab.data.instruct import restatement
    items = [{"family": "arithmetic", "answer": "80", "problem": "arith:51 + 29"},
             {"family": "arithmetic", "answer": "16", "problem": "arith:61 - 45"},
             {"family": "strings", "answer": "erohs", "problem": "rev:shore"},
             {"family": "strings", "answer": "1", "problem": "count:b:subject"},
             {"family": "decline", "answer": "I'm sorry, I can't answer that."}]
    replies = ["29 + 51 = 70.", "45 - 61 = 16.", "'shore' reversed is 'shore'.", "'supper' has 1 b.", "No."]
    assert [restatement(i, r) for i, r in zip(items, replies)] == [True, False, True, False, None]
    assert restatement(items[0], "80") is None   # restates nothing
    s = exam.summarise(items, replies)
    assert s["restated"] == {"arithmetic": 0.5, "strings": 0.5}
    assert s["per_family"]["arithmetic"] == 0.0   # copied right, computed wrong
    assert exam.format_restated({"m": s}).startswith("Replies that restate") and "arithmetic 50%" in \
        exam.format_restated({"m": s})


def test_roughen_keeps_slots_and_payload():
    rng = random.Random(0)
    for t in phrasing.ADD + phrasing.REVERSE + phrasing.TO_CHINESE:
        for _ in range(20):
            r = phrasing.roughen(t, rng, p=1.0)
            assert sorted(re.findall(r"\{\w+\}", r)) == sorted(re.findall(r"\{\w+\}", t))


def test_exam_through_the_server_matches_the_engine(tmp_path, small_tokenizer):
    """The acceptance path: `gptlab serve` + the official openai client at temperature 0 gives the same
    replies as the exam's own greedy pass over the run folder, so the report's figure is the server's."""
    import torch
    from test_serve import LiveServer

    from gptlab.generate.engine import Engine
    from gptlab.model.gpt import GPT, GPTConfig
    from gptlab.serve.app import create_app
    from gptlab.serve.backend import Backend
    from gptlab.train.heldout import task_accuracy

    torch.manual_seed(0)
    tok = small_tokenizer
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=160, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():   # larger weights than GPT's init: prompt-dependent, non-empty greedy text
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5)
    items = exam.build_exam(2)
    local = task_accuracy(model, tok, items, max_new_tokens=48, return_responses=True)["responses"]
    backend = Backend(Engine(model, tok), "tiny", max_batch=4)
    try:
        with LiveServer(create_app(backend)) as server:
            served = exam.exam_server(f"{server.url}/v1", items, model="tiny")
    finally:
        backend.close()
    assert served == local and any(served)
