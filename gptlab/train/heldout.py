"""Held-out answers: greedy generation on curriculum prompts, checked and scored.

SFT and DPO report task accuracy (``task_accuracy``) at every evaluation; PPO reports accuracy, the
labeler's score, the reward model's score and answer length (``heldout_metrics``), and `gptlab compare`
(gptlab.evals.compare) runs ``heldout_metrics`` on two finished runs. PPO's rollouts use the same
prompt encoding and generation (``encode_prompts``, ``generate``, ``score_sequences``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from gptlab.data.formats import load_prompt_items
from gptlab.data.instruct import check_answer
from gptlab.errors import GptlabError
from gptlab.generate.engine import Engine, SamplingParams
from gptlab.label.labeler import score as label_score
from gptlab.model.gpt import GPT
from gptlab.model.heads import ScalarHeadModel
from gptlab.tokenizer.chat_template import end_of_turn_id, fit_prompt
from gptlab.train.sequences import pad_batch


# ----- curriculum items -----------------------------------------------------------------------------------
def curriculum_heldout(data: Path) -> Path | None:
    """The held-out items of the curriculum that ``data`` belongs to (written side by side)."""
    held = data.parent / "heldout.jsonl"
    if (data.parent / "curriculum.json").is_file() and held.is_file():
        return held
    return None


def checked_by_family(items: list[dict], responses: list[str]) -> dict[str, list[int]]:
    """{family: [1 if right else 0, ...]}: each response checked with check_answer, grouped by family."""
    right: dict[str, list[int]] = {}
    for it, text in zip(items, responses):
        right.setdefault(it.get("family", "?"), []).append(int(check_answer(it, text)))
    return right


def task_accuracy(model, tok, items: list[dict], max_new_tokens: int = 48, batch_size: int = 64,
                  return_responses: bool = False) -> dict:
    """Greedy answers to curriculum prompt items, checked with gptlab.data.instruct.check_answer.

    Returns {"accuracy", "per_family": {family: accuracy}, "n", "mean_response_tokens"} (+ "responses").
    """

    was_training = model.training
    engine = Engine(model, tok)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    room = max(1, model.config.block_size - max_new_tokens)
    responses: list[str] = []
    lengths: list[int] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        prompts = []
        for it in chunk:
            try:
                prompts.append(fit_prompt(tok, it["messages"], room).ids)
            except GptlabError:   # a prompt too long for the window: answered from its tail
                prompts.append(fit_prompt(tok, it["messages"][-1:], 10 ** 9).ids[-room:])
        for c in engine.generate(prompts, params):
            responses.append(c.text)
            lengths.append(len(c.ids))
    model.train(was_training)
    right = checked_by_family(items, responses)
    total = sum(sum(v) for v in right.values())
    out = {"accuracy": total / max(1, len(items)), "n": len(items),
           "per_family": {f: sum(v) / len(v) for f, v in sorted(right.items())},
           "mean_response_tokens": sum(lengths) / max(1, len(lengths))}
    if return_responses:
        out["responses"] = responses
    return out


def load_eval_items(path: str | Path, limit: int | None) -> list[dict]:
    items = load_prompt_items(path)
    for i, it in enumerate(items):
        if "family" not in it or "answer" not in it:
            raise GptlabError(f"{path}: item {i + 1} has no \"family\"/\"answer\" (use the curriculum's heldout.jsonl)")
    if limit:
        # Every family keeps its share: take items round-robin by family, in file order.
        by_family: dict[str, list[dict]] = {}
        for it in items:
            by_family.setdefault(it["family"], []).append(it)
        picked, k = [], 0
        while len(picked) < min(limit, len(items)):
            for fam in by_family.values():
                if k < len(fam) and len(picked) < limit:
                    picked.append(fam[k])
            k += 1
        items = picked
    return items


def format_accuracy(acc: dict) -> str:
    fams = ", ".join(f"{f} {100 * a:.0f}%" for f, a in acc["per_family"].items())
    return f"{100 * acc['accuracy']:.1f}% of {acc['n']} ({fams}); mean answer {acc['mean_response_tokens']:.1f} tokens"


# ----- generation and scoring -----------------------------------------------------------------------------
def encode_prompts(tok, items: list[dict], max_prompt_tokens: int) -> tuple[list[dict], list[list[int]]]:
    """Render each prompt with the chat template, dropping its oldest turns to fit; prompts whose last
    message alone does not fit are skipped. Returns the kept items and their ids."""
    kept, ids = [], []
    for it in items:
        try:
            fitted = fit_prompt(tok, it["messages"], max_prompt_tokens)
        except GptlabError:
            continue
        kept.append(it)
        ids.append(fitted.ids)
    return kept, ids


def generate(policy: GPT, tok, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float,
             seeds: list[int] | None = None, stop: list[str] | None = None):
    """Completions from the shared engine (KV cache, stops at end of turn or a ``stop`` string);
    restores train/eval mode."""
    was_training = policy.training
    params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop=stop or [],
                             seed=(seeds[i] if seeds else 0)) for i in range(len(prompt_ids))]
    try:
        return Engine(policy, tok).generate(prompt_ids, params)
    finally:
        policy.train(was_training)


def reply_text(tok, completion) -> str:
    return tok.decode(completion.ids, skip_special=True)


@torch.no_grad()
def score_sequences(rm: ScalarHeadModel, seqs: list[list[int]], pad_id: int, chunk: int = 32) -> torch.Tensor:
    """Reward-model score of each (prompt + response + end-of-turn) sequence, read at its last token."""
    device = next(rm.parameters()).device
    out = []
    for i in range(0, len(seqs), chunk):
        ids, lengths = pad_batch(seqs[i:i + chunk], pad_id)
        out.append(rm(ids.to(device), lengths.to(device)).float().cpu())
    return torch.cat(out)


def heldout_metrics(policy: GPT, tok, items: list[dict], prompt_ids: list[list[int]], max_new_tokens: int,
                    rm: ScalarHeadModel | None = None, pad_id: int = 0,
                    transcript: bool = False) -> tuple[dict, list[str]]:
    """Greedy answers to held-out prompts: task accuracy (check_answer), labeler score, mean response
    length in tokens, the fraction that ended, and the reward model's mean score. ``transcript``: the
    prompts are plain-text transcripts (``transcript_prompt``) and an answer ends at a newline."""
    comps = generate(policy, tok, prompt_ids, max_new_tokens, temperature=0.0, stop=["\n"] if transcript else None)
    texts = [c.text.strip() if transcript else reply_text(tok, c) for c in comps]
    checkable = [(it, t) for it, t in zip(items, texts) if "answer" in it and "family" in it]
    out = {"heldout_len": sum(len(c.ids) for c in comps) / max(1, len(comps)),
           "heldout_ended": sum(c.finish_reason == "stop" for c in comps) / max(1, len(comps))}
    if checkable:
        out["heldout_accuracy"] = sum(check_answer(it, t) for it, t in checkable) / len(checkable)
        out["heldout_label_score"] = sum(label_score(it, t) for it, t in checkable) / len(checkable)
    if rm is not None:
        end = end_of_turn_id(tok)
        seqs = [p + c.ids + [end] for p, c in zip(prompt_ids, comps)]
        out["heldout_rm_score"] = float(score_sequences(rm, seqs, pad_id).mean())
    return out, texts
