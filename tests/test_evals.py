"""Few-shot harness, likelihood scoring, perplexity / bits per byte, user tasks, fill, end to end."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from gptlab import runs
from gptlab.errors import GptlabError
from gptlab.evals import fewshot
from gptlab.evals.fewshot import evaluate_task
from gptlab.evals.perplexity import perplexity, score_continuations, windows
from gptlab.evals.tasks import (Item, Task, blank_task, build_prompt, choose_demos, cloze_task,
                                load_jsonl_task, mixture_task, task_names)
from gptlab.model.gpt import GPT, GPTConfig

LINES = [
    "Now is the winter of our discontent made glorious summer",
    "And all the clouds that lour'd upon our house are buried",
    "Shall I compare thee to a summer's day and find thee lovely",
    "The quality of mercy is not strain'd it droppeth as the gentle rain",
    "Friends Romans countrymen lend me your ears and hear my cause",
    "Once more unto the breach dear friends once more or close the wall",
    "All the world's a stage and all the men and women merely players",
    "What light through yonder window breaks it is the east and Juliet",
]


def tiny(tok, arch="gpt2", block=96, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset("tiny", arch, vocab_size=tok.vocab_size, block_size=block,
                                n_layer=2, n_embd=64)).eval()


def save_run(path, model, tok):
    runs.write_run_config(path, model.config, tok, stage="pretrain")
    runs.save_tensors(path / "model.safetensors", runs.gpt_state(model))
    return path


# ----- prompts and demonstrations -----------------------------------------------------------------
def _toy_task():
    pool = [Item(key=str(i), prompt=f"{i} + 1 =", answer=f" {i + 1}") for i in range(10)]
    return Task("inc", "gen", pool[:3], pool, description="Add one.")


def test_prompt_exact_string_for_k_shots():
    task = _toy_task()
    q, demos = task.items[0], [task.pool[5], task.pool[7]]
    assert build_prompt(task, q, []) == "Add one.\n0 + 1 ="
    assert build_prompt(task, q, demos) == "Add one.\n5 + 1 = 6\n7 + 1 = 8\n0 + 1 ="
    assert build_prompt(task, q, demos, description=False) == "5 + 1 = 6\n7 + 1 = 8\n0 + 1 ="


def test_dictionary_translation_prompt_lists_query_and_demo_pairs():
    task = mixture_task("zh2en", 5, seed=0)
    demos = choose_demos(task, 2, seed=0)[0]
    prompt = build_prompt(task, task.items[0], demos)
    lines = prompt.split("\n")
    assert lines[0] == "Translate Chinese to English:"
    assert lines[1].startswith("Dictionary: ")
    q = task.items[0].extra
    assert f"[{q['zh']} => {q['en']}]" in lines[1]
    for d in demos:
        assert f"[{d.extra['zh']} => {d.extra['en']}]" in lines[1]
        assert d.line() in lines
    assert lines[-1] == f"{q['zh']} =>"


@pytest.mark.parametrize("family", ["add2", "cycle", "en2zh", "anagram2"])
def test_demonstrations_never_include_the_query(family):
    from gptlab.data.mixture import is_heldout
    task = mixture_task(family, 40, seed=3)
    for item, demos in zip(task.items, choose_demos(task, 8, seed=3)):
        assert len(demos) == 8
        assert all(d.key != item.key for d in demos)
        assert all(is_heldout(family, d.key) for d in demos)   # demonstrations are held out too
    assert all(is_heldout(family, it.key) for it in task.items)


def test_demos_are_nested_and_dropped_when_too_long(small_tokenizer):
    task = _toy_task()
    dl = choose_demos(task, 8, seed=0)
    qs4 = fewshot.make_queries(task, 4, dl, small_tokenizer, block_size=512)
    qs8 = fewshot.make_queries(task, 8, dl, small_tokenizer, block_size=512)
    assert [d.key for d in qs8[0].demos[:4]] == [d.key for d in qs4[0].demos]
    short = fewshot.make_queries(task, 8, dl, small_tokenizer, block_size=40)
    assert 0 < len(short[0].demos) < 8
    assert short[0].demos == qs8[0].demos[-len(short[0].demos):]   # the oldest ones go first
    with pytest.raises(GptlabError):
        fewshot.make_queries(task, 0, dl, small_tokenizer, block_size=4)


def test_task_names_expand_groups():
    assert task_names(["arithmetic,cloze", "add2"]) == ["add2", "add3", "sub2", "sub3", "cloze"]
    assert task_names(["icl"]) == ["icl_upper", "icl_reverse", "icl_first", "icl_last"]
    with pytest.raises(GptlabError):
        task_names([","])


# ----- scoring ------------------------------------------------------------------------------------
def test_loglik_scoring_equals_hand_computation(small_tokenizer):
    tok = small_tokenizer
    model = tiny(tok, block=24)
    ctxs = [tok.encode("To be, or not"), tok.encode("23 +"), tok.encode("The slings and arrows of outrageous")]
    conts = [tok.encode(" to be"), tok.encode(" 58 = 81"), tok.encode(" fortune")]
    ctxs.append(tok.encode(LINES[0] + LINES[1]))          # longer than the window: left-truncated
    conts.append(tok.encode(" glory"))
    for bs in (1, 3):
        got = score_continuations(model, ctxs, conts, batch_size=bs)
        for (s, n), ctx, cont in zip(got, ctxs, conts):
            seq = (ctx + cont)[-25:]
            with torch.no_grad():
                logits, _ = model(torch.tensor([seq[:-1]]))
            lp = F.log_softmax(logits[0].float(), -1)
            hand = sum(float(lp[t - 1, seq[t]]) for t in range(len(seq) - len(cont), len(seq)))
            assert n == len(cont)
            assert s == pytest.approx(hand, abs=1e-4)


def _mc_task():
    items = [Item(key="a", prompt="Q", answer=" long answer", choices=[" x", " long answer"], label=1)]
    return Task("mc", "mc", items, items)


def test_length_normalisation(monkeypatch, small_tokenizer):
    # choice 0: one token, sum -3 (mean -3); choice 1: four tokens, sum -4 (mean -1)
    monkeypatch.setattr("gptlab.evals.perplexity.score_continuations",
                        lambda model, ctxs, conts, batch_size=32: [(-3.0, 1), (-4.0, 4)])
    model = tiny(small_tokenizer)
    norm, _ = evaluate_task(model, small_tokenizer, _mc_task(), [0], normalize=True, show_progress=False)
    raw, _ = evaluate_task(model, small_tokenizer, _mc_task(), [0], normalize=False, show_progress=False)
    assert norm["0"]["acc"] == 1.0 and raw["0"]["acc"] == 0.0
    assert norm["0"]["acc_norm"] == 1.0 and norm["0"]["acc_raw"] == 0.0


def test_exact_match_generation_scoring(monkeypatch, small_tokenizer):
    from gptlab.generate.engine import Completion, Engine
    seen = {}

    def fake_generate(self, prompts, params, use_cache=True):
        seen["params"] = params
        return [Completion([], t, "stop", len(p)) for p, t in zip(prompts, [" 2 ", "3", " 40"])]

    monkeypatch.setattr(Engine, "generate", fake_generate)
    task = _toy_task()   # answers " 1", " 2", " 3"
    res, preds = evaluate_task(tiny(small_tokenizer), small_tokenizer, task, [0], show_progress=False)
    assert seen["params"].temperature == 0 and seen["params"].stop == ["\n"]
    assert [p["correct"] for p in preds] == [False, False, False]
    task.items = task.pool[1:4]   # answers " 2", " 3", " 4"
    res, preds = evaluate_task(tiny(small_tokenizer), small_tokenizer, task, [0], show_progress=False)
    assert [p["correct"] for p in preds] == [True, True, False]
    assert res["0"]["correct"] == 2 and res["0"]["n"] == 3


def test_real_generation_stops_at_newline(small_tokenizer):
    task = _toy_task()
    _, preds = evaluate_task(tiny(small_tokenizer), small_tokenizer, task, [0, 2], show_progress=False)
    assert len(preds) == 6 and all("\n" not in p["prediction"] for p in preds)


def test_gold_answer_probability_is_the_teacher_forced_likelihood(small_tokenizer):
    import math
    from gptlab.evals.perplexity import score_continuations
    model, task = tiny(small_tokenizer), _toy_task()
    res, preds = evaluate_task(model, small_tokenizer, task, [0, 2], show_progress=False)
    tok = small_tokenizer
    for k in (0, 2):
        rows = [p for p in preds if p["k"] == k]
        ctxs = [[tok.eot_id] + tok.encode(p["prompt"]) for p in rows]
        want = score_continuations(model, ctxs, [tok.encode(p["answer"]) for p in rows])
        assert [p["gold_logprob"] for p in rows] == pytest.approx([lp for lp, _ in want], abs=1e-3)
        assert res[str(k)]["gold_prob"] == pytest.approx(sum(math.exp(lp) for lp, _ in want) / len(want), rel=1e-4)
        assert 0 < res[str(k)]["gold_prob"] < 1 and res[str(k)]["gold_logprob_per_token"] < 0


# ----- perplexity and bits per byte ---------------------------------------------------------------
def test_windows_cover_every_target_once():
    for n, bs, stride in [(5, 8, 4), (100, 16, 5), (33, 16, 16)]:
        seen = []
        for c, a, b in windows(n, bs, stride):
            assert b - c <= bs + 1 and c <= a
            seen.extend(range(a, b))
        assert seen == list(range(1, n + 1))


def test_bits_per_byte_formula(small_tokenizer):
    tok = small_tokenizer
    model = tiny(tok, block=64)
    text = "To be, or not to be, that is the question: 苹果 => apple"
    ids = [tok.eot_id] + tok.encode(text)
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    nll = -float(F.log_softmax(logits[0], -1).gather(-1, torch.tensor(ids[1:])[:, None]).sum())
    r = perplexity(model, tok, text, show_progress=False)
    assert r["tokens"] == len(ids) - 1 and r["bytes"] == len(text.encode("utf-8"))
    assert r["bits_per_byte"] == pytest.approx(nll / math.log(2) / r["bytes"], rel=1e-4)
    assert r["perplexity"] == pytest.approx(math.exp(nll / r["tokens"]), rel=1e-4)
    long = "\n".join(LINES * 3)
    r2 = perplexity(model, tok, long, stride=16, show_progress=False)
    assert r2["tokens"] == len(tok.encode(long))


# ----- user tasks ---------------------------------------------------------------------------------
def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                    encoding="utf-8")
    return path


def test_jsonl_user_tasks_both_kinds(tmp_path):
    mc = load_jsonl_task(_write(tmp_path / "mc.jsonl", [
        {"question": "The capital of France is", "choices": ["Paris", "Rome"], "answer": "Paris"},
        {"question": "2 + 2 =", "choices": [" 4", " 5"], "answer": 0}]))
    assert mc.kind == "mc" and mc.items[0].choices == [" Paris", " Rome"] and mc.items[0].label == 0
    assert mc.items[1].choices == [" 4", " 5"] and mc.items[1].label == 0
    gen = load_jsonl_task(_write(tmp_path / "gen.jsonl", [{"prompt": "1 + 1 =", "answer": "2"},
                                                           {"prompt": "2 + 2 =", "answer": " 4"}]))
    assert gen.kind == "gen" and [i.answer for i in gen.items] == [" 2", " 4"]


@pytest.mark.parametrize("rows", [
    [],
    ["{not json"],
    [{"text": "hi"}],
    [{"question": "q", "choices": ["a"], "answer": "a"}],
    [{"question": "q", "choices": ["a", "b"], "answer": "c"}],
    [{"question": "q", "choices": ["a", "b"], "answer": 5}],
    [{"prompt": "p"}],
    [{"prompt": "p", "answer": "a"}, {"question": "q", "choices": ["a", "b"], "answer": "a"}],
])
def test_bad_jsonl_task_is_one_line_error(tmp_path, rows, capsys):
    from gptlab.cli import main
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(GptlabError):
        load_jsonl_task(path)
    run = save_run(tmp_path / "run", tiny(_tok()), _tok())
    assert main(["eval", str(run), "--tasks", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


_TOK = {}


def _tok():
    if "t" not in _TOK:
        from conftest import SAMPLE_TEXT
        from gptlab.tokenizer import Tokenizer
        _TOK["t"] = Tokenizer.train([SAMPLE_TEXT], vocab_size=400)
    return _TOK["t"]


# ----- Shakespeare-style tasks with given lines (the corpus is not downloaded in tests) -------------
def test_cloze_and_blank_tasks(small_tokenizer):
    cl = cloze_task(5, 0, lines=LINES)
    for it in cl.items:
        assert it.choices[it.label] == it.answer and len(set(it.choices)) == 4
        assert it.line() in [line.rstrip(" ,.;:!?") for line in LINES]
    bl = blank_task(5, 0, lines=LINES, n_choices=5)
    for it in bl.items:
        assert it.line() in LINES and it.choices[it.label] == it.answer
    for arch in ("gpt2", "bert"):
        res, _ = evaluate_task(tiny(small_tokenizer, arch), small_tokenizer, bl, [0, 1], show_progress=False)
        assert set(res) == {"0", "1"} and res["0"]["n"] == 5


def test_bert_run_refuses_generation_tasks(small_tokenizer):
    with pytest.raises(GptlabError):
        evaluate_task(tiny(small_tokenizer, "bert"), small_tokenizer, _toy_task(), [0], show_progress=False)


# ----- end to end ---------------------------------------------------------------------------------
def test_eval_end_to_end_writes_results_and_png(tmp_path, small_tokenizer, capsys):
    from gptlab.cli import main
    runs = [save_run(tmp_path / f"run{i}", tiny(small_tokenizer, seed=i), small_tokenizer) for i in range(2)]
    mc = _write(tmp_path / "mc.jsonl", [{"question": f"{i} + 1 =", "choices": [f" {i + 1}", f" {i + 2}"],
                                         "answer": 0} for i in range(6)])
    gen = _write(tmp_path / "gen.jsonl", [{"prompt": f"{i} + 1 =", "answer": f"{i + 1}"} for i in range(6)])
    out = tmp_path / "out"
    rc = main(["eval", *map(str, runs), "--tasks", "add2", str(mc), str(gen), "--shots", "0,2",
               "--n", "3", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["tasks"] == ["add2", "mc", "gen"] and set(res["runs"]) == {"run0", "run1"}
    for per_task in res["runs"].values():
        for task in res["tasks"]:
            assert set(per_task[task]) == {"0", "2"}
            assert all(0 <= v["acc"] <= 1 and v["n"] == 3 for v in per_task[task].values())
    assert "## add2" in (out / "results.md").read_text()
    assert (out / "accuracy_vs_shots.png").read_bytes()[:4] == b"\x89PNG"
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2 * 3 * 2 * 3
    text = tmp_path / "held.txt"
    text.write_text("\n".join(LINES), encoding="utf-8")
    assert main(["eval", str(runs[0]), "--text", str(text), "--out", str(out)]) == 0
    assert json.loads((out / "perplexity.json").read_text())["runs"]["run0"]["bits_per_byte"] > 0
    assert "bits/byte" in capsys.readouterr().out
    assert main(["eval", str(runs[0]), "--copy", "--n", "4", "--out", str(out)]) == 0
    assert set(json.loads((out / "copy.json").read_text())["runs"]["run0"]) >= {"first", "second", "drop"}
    assert "said again" in capsys.readouterr().out


class _Copier(torch.nn.Module):
    """A stand-in model for copy_losses: each row is "\n" + line (+ line again); from the second saying
    on it puts all its probability on the token one line-length back (perfect copying), elsewhere it
    knows nothing (uniform). ``copies=False``: uniform everywhere, a model that cannot copy."""

    def __init__(self, vocab: int, copies: bool):
        super().__init__()
        self.config = type("C", (), {"causal": True, "block_size": 256})()
        self.vocab, self.copies, self.w = vocab, copies, torch.nn.Parameter(torch.zeros(1))

    def hidden(self, x):
        return x

    def lm_logits(self, x):
        logits = torch.zeros(*x.shape, self.vocab)
        if self.copies:
            nl = x[0, 0]
            for r in range(x.shape[0]):
                ends = (x[r, 1:] == nl).nonzero()
                if len(ends) == 0:   # the line said once: nothing to copy from
                    continue
                period = int(ends[0]) + 1   # the line and its "\n"
                for t in range(period, x.shape[1]):
                    logits[r, t, x[r, t + 1 - period]] = 50.0
        return logits


def test_copy_losses_tell_a_copier_from_a_model_that_cannot_copy(small_tokenizer):
    from gptlab.evals.perplexity import copy_losses
    v = small_tokenizer.vocab_size
    copier = copy_losses(_Copier(v, True), small_tokenizer, n=6, seed=1)
    blind = copy_losses(_Copier(v, False), small_tokenizer, n=6, seed=1)
    assert blind["first"] == pytest.approx(math.log(v)) and blind["drop"] == pytest.approx(0, abs=1e-6)
    assert copier["first"] == pytest.approx(math.log(v)) and copier["second"] < 0.01 * math.log(v)
    assert copier["drop"] > 0.99 * math.log(v)


def test_lookup_task_answers_only_from_the_dictionary():
    from gptlab.data.mixture import parse_dictionary_line
    from gptlab.evals.tasks import load_task
    task = load_task("lookup", 20, seed=1)
    assert len(task.items) == 20 and len({it.key for it in task.pool}) == len(task.pool)
    assert load_task("lookup", 20, seed=1).items[3].answer == task.items[3].answer   # deterministic
    assert load_task("lookup", 20, seed=2).items[3].answer != task.items[3].answer   # fresh pairing
    for item, demos in zip(task.items, choose_demos(task, 4, seed=0)):
        lines = build_prompt(task, item, demos).split("\n")
        assert lines[0] == task.description and lines[-1] == item.prompt
        pairs = dict(parse_dictionary_line(lines[1]))
        assert pairs[item.extra["zh"]] == item.answer.strip()
        assert len(pairs) == 8   # the same size at every k up to 7
        assert [d.line() for d in demos] == lines[2:-1]


@pytest.mark.parametrize("family", ["en2zh", "zh2en"])
def test_trilingual_task_only_demonstrations_say_which_column(family):
    from gptlab.data.mixture import parse_dictionary_line
    from gptlab.evals.tasks import load_task
    name = "dict3_" + family
    task = load_task(name, 30, seed=2)
    assert task.description is None
    again = load_task(name, 30, seed=2)
    assert build_prompt(again, again.items[5], []) == build_prompt(task, task.items[5], [])   # deterministic
    assert len({it.extra["code"] for it in task.pool}) == len(task.pool)        # unique code words
    demo_lists = choose_demos(task, 8, seed=0)
    swapped = 0
    for item, demos in zip(task.items, demo_lists):
        orders = set()
        for k in (0, 1, 4, 8):
            lines = build_prompt(task, item, demos[:k]).split("\n")
            assert lines[-1] == item.prompt and len(lines) == k + 2   # no description line
            assert [d.line() for d in demos[:k]] == lines[1:-1]       # nested demonstrations
            entries = {e[0]: e[1:] for e in parse_dictionary_line(lines[0])}
            assert all(len(e) == 2 for e in entries.values())
            src = item.prompt.removesuffix(" =>")
            row = entries[src]
            assert item.answer.strip() in row and item.extra["code"] in row
            orders.add(row.index(item.answer.strip()))
            for d in demos[:k]:   # every demonstration's answer is in its own entry
                assert d.answer.strip() in entries[d.prompt.removesuffix(" =>")]
        assert len(orders) == 1   # one column order per query, whatever k
        swapped += orders.pop()
    assert 0 < swapped < len(task.items)   # both orders occur, so k = 0 cannot know the column


def test_wordop_tasks_only_demonstrations_name_the_operation():
    from gptlab.data.mixture import WORD_OPS, is_heldout
    from gptlab.evals.tasks import load_task
    tasks = {op: load_task("icl_" + op, 40, seed=1) for op in WORD_OPS}
    for op, task in tasks.items():
        assert task.name == "icl_" + op and task.description is None and len(task.items) == 40
        for item, demos in zip(task.items, choose_demos(task, 4, seed=0)):
            word = item.extra["word"]
            assert is_heldout("reverse", word)                       # never in pre-training
            assert build_prompt(task, item, []) == f"{word} ->"      # zero-shot: the word alone
            assert item.answer == " " + WORD_OPS[op](word)
            assert word not in {d.key for d in demos} and len(demos) == 4
            assert build_prompt(task, item, demos) == "".join(d.line() + "\n" for d in demos) + f"{word} ->"
    # The same queries for every operation: the four tasks' zero-shot prompts are identical, each
    # with a different right answer, so k = 0 cannot be right on more than one of them.
    for i in range(40):
        assert len({build_prompt(t, t.items[i], []) for t in tasks.values()}) == 1
        assert len({t.items[i].answer for t in tasks.values()}) == 4
