"""GPT-1 fine-tuning: input transformations, heads per task type, the auxiliary LM loss, datasets, CLI."""
import json
import random

import pytest
import torch

from gptlab import runs
from gptlab.cli import main
from gptlab.data.finetune_tasks import Example, builtin_task, load_file
from gptlab.errors import GptlabError
from gptlab.model.gpt import GPT, GPTConfig
from gptlab.tokenizer import DELIM, EXTRACT, START
from gptlab.train.finetune import (FineTuneModel, TaskEncoder, collate, finetune_loss, fit_parts,
                                   predict_probs)


def tiny_gpt(vocab, block=48, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset("tiny", "gpt2", vocab_size=vocab, block_size=block, n_layer=2,
                                n_head=2, n_embd=32))


@pytest.fixture
def base_run(tmp_path, small_tokenizer):
    """A 'pre-trained' run folder (random weights: enough to exercise the command)."""
    run = tmp_path / "base"
    model = tiny_gpt(small_tokenizer.vocab_size)
    runs.write_run_config(run, model.config, small_tokenizer, stage="pretrain")
    runs.save_tensors(run / runs.MODEL_FILE, runs.gpt_state(model))
    return run


def ids(tok):
    return tok.special_id(START), tok.special_id(DELIM), tok.special_id(EXTRACT)


# ----- input transformations -----------------------------------------------------------------------
def test_classification_and_entailment_layout(small_tokenizer):
    tok = small_tokenizer
    s, d, e = ids(tok)
    enc = TaskEncoder(tok, "classification", 48)
    assert enc.sequences(Example(("to be or not",), 0)) == [[s] + tok.encode("to be or not") + [e]]
    enc = TaskEncoder(tok, "entailment", 48)
    seqs = enc.sequences(Example(("the sea", "of troubles"), 1))
    assert seqs == [[s] + tok.encode("the sea") + [d] + tok.encode("of troubles") + [e]]


def test_similarity_makes_both_orders(small_tokenizer):
    tok = small_tokenizer
    s, d, e = ids(tok)
    a, b = tok.encode("to sleep"), tok.encode("to die")
    seqs = TaskEncoder(tok, "similarity", 48).sequences(Example(("to sleep", "to die"), 0))
    assert seqs == [[s] + a + [d] + b + [e], [s] + b + [d] + a + [e]]


def test_multiple_choice_one_sequence_per_answer(small_tokenizer):
    tok = small_tokenizer
    s, d, e = ids(tok)
    ex = Example(("whether tis nobler",), 2, ("in the mind", "the slings", "to suffer"))
    seqs = TaskEncoder(tok, "multiple_choice", 48).sequences(ex)
    assert seqs == [[s] + tok.encode("whether tis nobler") + [d] + tok.encode(c) + [e] for c in ex.choices]


def test_truncation_keeps_the_right_end(small_tokenizer):
    tok = small_tokenizer
    s, d, e = ids(tok)
    text = "the slings and arrows of outrageous fortune " * 10
    seq = TaskEncoder(tok, "classification", 20).sequences(Example((text,), 0))[0]
    assert len(seq) == 20 and seq[0] == s and seq[-1] == e
    assert seq[1:-1] == tok.encode(text)[-18:]
    # Pairs: the first part loses tokens from its left; a short second part stays whole.
    seq = TaskEncoder(tok, "entailment", 20).sequences(Example((text, "to die"), 0))[0]
    hyp = tok.encode("to die")
    assert len(seq) == 20 and seq[-len(hyp) - 2:] == [d] + hyp + [e]
    assert seq[1:seq.index(d)] == tok.encode(text)[-(17 - len(hyp)):]
    assert fit_parts([list(range(30)), list(range(30))], 10) == [list(range(25, 30)), list(range(25, 30))]


def test_collate_pads_and_masks_lm_targets():
    b = collate([([[5, 6, 7]], 1), ([[8, 9]], 0)], pad=0)
    assert b["idx"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert b["lengths"].tolist() == [3, 2]
    assert b["targets"].tolist() == [[6, 7], [9, -100]]
    assert b["labels"].tolist() == [1, 0]


# ----- heads ---------------------------------------------------------------------------------------
def test_similarity_adds_both_orders_before_the_head(small_tokenizer):
    tok = small_tokenizer
    model = FineTuneModel(tiny_gpt(tok.vocab_size), "similarity", 2).eval()
    enc = TaskEncoder(tok, "similarity", 48)
    items = enc.encode_all([Example(("to sleep perchance", "to dream"), 0)])
    b = collate(items, enc.pad)
    logits, _ = model(b["idx"], b["lengths"], 2)
    with torch.no_grad():
        h = model.gpt.hidden(b["idx"])
        f = h[torch.arange(2), b["lengths"] - 1]
        expected = model.clf_head(f[0] + f[1])
    assert torch.allclose(logits[0], expected, atol=1e-5)
    # Order of the pair does not matter: both orders are always summed.
    swapped = collate(enc.encode_all([Example(("to dream", "to sleep perchance"), 0)]), enc.pad)
    assert torch.allclose(model(swapped["idx"], swapped["lengths"], 2)[0], logits, atol=1e-5)


def test_multiple_choice_softmax_across_answers(small_tokenizer):
    tok = small_tokenizer
    model = FineTuneModel(tiny_gpt(tok.vocab_size), "multiple_choice", 1).eval()
    assert model.clf_head.out_features == 1
    enc = TaskEncoder(tok, "multiple_choice", 48)
    choices = ("in the mind", "a sea of troubles", "to sleep")
    items = enc.encode_all([Example(("whether tis nobler",), 0, choices)])
    probs = predict_probs(model, items, enc.pad, 3)
    assert probs.shape == (1, 3) and abs(float(probs.sum()) - 1) < 1e-5
    # Each answer's score comes from its own sequence alone.
    scores = []
    for seq in items[0][0]:
        b = collate([([seq], 0)], enc.pad)
        with torch.no_grad():
            scores.append(float(model.clf_head(model.gpt.hidden(b["idx"])[0, -1])))
    assert torch.allclose(probs[0], torch.tensor(scores).softmax(-1), atol=1e-5)
    # Reordering the answers reorders the probabilities.
    rev = enc.encode_all([Example(("whether tis nobler",), 0, choices[::-1])])
    assert torch.allclose(predict_probs(model, rev, enc.pad, 3)[0], probs[0].flip(0), atol=1e-5)


def test_auxiliary_lm_loss_switch(small_tokenizer):
    tok = small_tokenizer
    enc = TaskEncoder(tok, "entailment", 48)
    items = enc.encode_all([Example(("to be", "or not to be"), 1), Example(("the sea", "to die"), 0)])
    b = collate(items, enc.pad)

    def grads(coef):
        model = FineTuneModel(tiny_gpt(tok.vocab_size), "entailment", 2, dropout=0.0)
        loss, metrics = finetune_loss(model, b, coef, 1)
        loss.backward()
        return loss.item(), metrics, model.gpt.transformer.wte.weight.grad.clone()

    l0, m0, g0 = grads(0.0)
    l5, m5, g5 = grads(0.5)
    assert "lm_loss" not in m0 and abs(l0 - m0["task_loss"]) < 1e-6
    assert abs(l5 - (m5["task_loss"] + 0.5 * m5["lm_loss"])) < 1e-5
    assert abs(m0["task_loss"] - m5["task_loss"]) < 1e-6      # same model, same task loss
    assert m5["lm_loss"] > 1.0 and not torch.allclose(g0, g5)  # the LM term changes the gradient


# ----- datasets ------------------------------------------------------------------------------------
def _fake_works(n_plays=3, speeches=120, seed=0):
    rng = random.Random(seed)
    works = {}
    for p in range(n_plays):
        words = [f"w{p}x{i}" for i in range(30)] + ["the", "and", "of", "my", "lord"]
        blocks = [f"PLAY {p}", ""]
        for s in range(speeches):
            blocks += [f"Lord {'ABC'[s % 3]}.",
                       *(" ".join(rng.choice(words) for _ in range(6)) for _ in range(3)), ""]
        works[f"Play {p}"] = "\n".join(blocks)
    return works


@pytest.mark.parametrize("name,task_type", [("play", "classification"), ("next-line", "entailment"),
                                            ("continuation", "multiple_choice"), ("same-play", "similarity")])
def test_builtin_tasks_are_deterministic_and_disjoint(name, task_type):
    works = _fake_works()
    t1 = builtin_task(name, seed=3, n_train=200, n_heldout=60, works=works)
    t2 = builtin_task(name, seed=3, n_train=200, n_heldout=60, works=works)
    assert t1.task_type == task_type and t1.train == t2.train and t1.heldout == t2.heldout
    assert t1.train and t1.heldout
    seen = {x for e in t1.train for x in e.texts + e.choices}
    assert not any(x in seen for e in t1.heldout for x in e.texts + e.choices)
    if name in ("next-line", "same-play"):
        labels = [e.label for e in t1.train]
        assert abs(labels.count(1) - labels.count(0)) <= 1
    if name == "continuation":
        assert all(len(e.choices) == 4 for e in t1.train)
    if name == "play":
        assert t1.labels == ["Play 0", "Play 1", "Play 2"]


def test_file_formats(tmp_path):
    csv_mc = tmp_path / "mc.csv"
    csv_mc.write_text("context,choice_0,choice_1,label\nc1,a,b,1\nc2,x,y,0\nc3,p,q,1\n")
    t = load_file(csv_mc)
    assert t.task_type == "multiple_choice" and t.labels == ["0", "1"] and t.n_outputs == 1
    jl = tmp_path / "pairs.jsonl"
    jl.write_text("\n".join(json.dumps({"text_a": f"a{i}", "text_b": "b", "label": i % 2 == 0})
                            for i in range(10)))
    t = load_file(jl, heldout_fraction=0.3, seed=1)
    assert t.task_type == "similarity" and t.labels == ["False", "True"]
    assert len(t.heldout) == 3 and len(t.train) == 7
    assert t.heldout == load_file(jl, heldout_fraction=0.3, seed=1).heldout


def _run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("content,suffix,extra,needle", [
    ("foo,label\nx,a\ny,b\n", ".csv", [], "cannot tell the task"),
    ("premise,label\nx,a\ny,b\n", ".csv", ["--task-type", "entailment"], "missing column 'hypothesis'"),
    ("text,label\nx,a\ny,c\nz,b\n", ".csv", ["--labels", "a,b"], "not in the label set"),
    ("", ".csv", [], "empty file"),
    ("", ".jsonl", [], "no labelled rows"),
    ('{"context": "c", "choices": ["a", "b"], "label": 2}\n', ".jsonl", [], "not a choice index"),
    ("text\tlabel\n", ".tsv", [], "unknown file type"),
])
def test_bad_datasets_give_one_error_line(tmp_path, base_run, capsys, content, suffix, extra, needle):
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    rc, out, err = _run(["finetune", "--init", str(base_run), "--task", str(path), "--out",
                         str(tmp_path / "o"), "--max-steps", "1", "--no-progress", *extra], capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error:") and needle in err


def test_unknown_task_name(tmp_path, base_run, capsys):
    rc, _, err = _run(["finetune", "--init", str(base_run), "--task", "no-such-task", "--out",
                       str(tmp_path / "o")], capsys)
    assert rc == 2 and err.startswith("error: unknown task 'no-such-task'") and err.count("\n") == 1


# ----- end to end ----------------------------------------------------------------------------------
def _word_task(path, n=240, seed=0):
    """Classification the model can learn from words alone: 'calm' vs 'storm' vocabulary."""
    rng = random.Random(seed)
    calm, storm = ["sleep", "dream", "rest", "mind"], ["arms", "sea", "troubles", "fortune"]
    filler = ["the", "and", "to", "of", "a", "by"]
    lines = ["text,label"]
    for i in range(n):
        label = "calm" if i % 2 else "storm"
        words = [rng.choice(calm if label == "calm" else storm) for _ in range(2)] + \
            [rng.choice(filler) for _ in range(4)]
        rng.shuffle(words)
        lines.append(f"{' '.join(words)},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_end_to_end_finetune_beats_chance_and_predict(tmp_path, base_run, capsys):
    data = _word_task(tmp_path / "words.csv")
    out = tmp_path / "ft"
    rc, stdout, err = _run(["finetune", "--init", str(base_run), "--task", str(data), "--out", str(out),
                            "--max-steps", "60", "--lr", "3e-3", "--no-progress", "--eval-every", "60"],
                           capsys)
    assert rc == 0, err
    assert "held-out accuracy" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heldout_accuracy"] >= 0.85           # chance is 0.5
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["finetune"]["task_type"] == "classification" and cfg["finetune"]["labels"] == ["calm", "storm"]
    assert cfg["finetune"]["lm_coef"] == 0.5
    assert "heads.clf_head.weight" in runs.load_tensors(out / "model.safetensors")
    assert (out / "curves.png").is_file() and (out / "metrics.jsonl").is_file()

    rc, stdout, _ = _run(["predict", str(out), "to sleep and dream", "the sea of troubles"], capsys)
    assert rc == 0
    rows = [line.split("\t") for line in stdout.strip().splitlines()]
    assert [r[0] for r in rows] == ["calm", "storm"] and all(0.5 < float(r[1]) <= 1 for r in rows)
    rc, _, err = _run(["predict", str(out), "x", "--pair", "a", "b"], capsys)
    assert rc == 2 and err.startswith("error:")


def test_multiple_choice_and_pair_runs_predict(tmp_path, base_run, capsys):
    mc = tmp_path / "mc.jsonl"
    mc.write_text("\n".join(json.dumps({"context": f"to be {i}", "choices": ["or not", "the sea", "to die"],
                                        "label": i % 3}) for i in range(12)))
    out = tmp_path / "mc"
    rc, _, err = _run(["finetune", "--init", str(base_run), "--task", str(mc), "--out", str(out),
                       "--max-steps", "2", "--no-progress", "--lm-coef", "0"], capsys)
    assert rc == 0, err
    rc, stdout, _ = _run(["predict", str(out), "to be", "--choices", "or not", "the sea"], capsys)
    label, prob, _ = stdout.strip().split("\t")
    assert rc == 0 and label in ("or not", "the sea") and 0.5 <= float(prob) <= 1

    pairs = tmp_path / "nli.csv"
    pairs.write_text("premise,hypothesis,label\n" + "".join(f"p{i},h{i},{'yes' if i % 2 else 'no'}\n"
                                                            for i in range(10)))
    out = tmp_path / "nli"
    assert main(["finetune", "--init", str(base_run), "--task", str(pairs), "--out", str(out),
                 "--max-steps", "2", "--no-progress"]) == 0
    capsys.readouterr()
    rc, stdout, _ = _run(["predict", str(out), "to be ||| or not", "--pair", "the sea", "to die", "--all"], capsys)
    lines = stdout.strip().splitlines()
    assert rc == 0 and len([ln for ln in lines if not ln.startswith(" ")]) == 2
    rc, _, err = _run(["predict", str(out), "no separator here"], capsys)
    assert rc == 2 and "|||" in err


def test_from_scratch_reinitialises(tmp_path, base_run, capsys):
    data = _word_task(tmp_path / "w.csv", n=40)
    for name, flag in (("pre", []), ("scratch", ["--from-scratch"])):
        assert main(["finetune", "--init", str(base_run), "--task", str(data), "--out", str(tmp_path / name),
                     "--max-steps", "1", "--lr", "1e-9", "--no-progress", "--eval-every", "1", *flag]) == 0
    base = runs.load_tensors(base_run / "model.safetensors")["transformer.h.0.attn.c_attn.weight"]
    pre = runs.load_tensors(tmp_path / "pre" / "model.safetensors")["transformer.h.0.attn.c_attn.weight"]
    fresh = runs.load_tensors(tmp_path / "scratch" / "model.safetensors")["transformer.h.0.attn.c_attn.weight"]
    assert torch.allclose(base, pre, atol=1e-5) and not torch.allclose(base, fresh, atol=1e-3)
    with pytest.raises(GptlabError):
        TaskEncoder(type("T", (), {"special_id": lambda self, t: None})(), "classification", 8)
