"""Zero-, one- and few-shot evaluation in the GPT-3 form (no gradient updates).

A k-shot prompt is: an optional task description line, optional context (the dictionary of the
translation tasks), k demonstration lines, then the query line cut before its answer. Every line is
in the pre-training mixture's format. When the prompt does not fit the context window, the oldest
demonstrations are dropped (the number actually used is reported as ``shots_used``).

Scoring:
* multiple choice: ``perplexity.score_continuations`` gives each choice's summed log-probability;
  the prediction is the choice with the highest log-prob per token (length-normalised, the default)
  or the highest sum (``normalize=False``). Both accuracies are recorded.
* generation: THE generation engine, greedy (temperature 0), stopping at a newline; exact match of
  the stripped text against the stripped answer.
* blank: the query line with each candidate word in place; GPT ranks by the line's log-likelihood,
  BERT by the candidate's pseudo-log-likelihood (its masked prediction for a one-token word).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tqdm import tqdm

from gptlab.errors import GptlabError
from gptlab.evals.stats import wilson_interval
from gptlab.evals.tasks import Item, Task, build_prompt, choose_demos, prompt_prefix


@dataclass
class Query:
    item: Item
    demos: list[Item]
    prefix: str          # everything before the query line


def fit_demos(task: Task, item: Item, demos: list[Item], tok, block_size: int, reserve: int,
              description: bool = True) -> list[Item]:
    """Drop the oldest demonstrations until [EOT] + prompt + ``reserve`` tokens fit the window."""
    demos = list(demos)
    while True:
        n = 1 + len(tok.encode(build_prompt(task, item, demos, description))) + reserve
        if n <= block_size or not demos:
            break
        demos = demos[1:]
    if n > block_size:
        raise GptlabError(f"task {task.name}: a query does not fit the {block_size}-token context "
                          f"even without demonstrations")
    return demos


def gen_budget(task: Task, tok) -> int:
    """New tokens to generate: the longest answer in this tokenizer plus a margin (more tokens can
    only turn an exact match into a miss; generation stops at the newline anyway)."""
    return min(task.max_new_tokens, max(len(tok.encode(it.answer)) for it in task.pool) + 3)


def _reserve(task: Task, item: Item, tok) -> int:
    """Tokens to keep free after the prompt: the longest choice, or the generation budget."""
    if task.kind == "gen":
        return gen_budget(task, tok)
    if task.kind == "mc":
        return max(len(tok.encode(c)) for c in item.choices)
    # blank: the query line is scored as a whole, so it must fit next to the prefix
    return max(len(tok.encode(item.prompt + c + item.right)) for c in item.choices) - len(tok.encode(item.prompt))


def make_queries(task: Task, k: int, demo_lists: list[list[Item]], tok, block_size: int,
                 description: bool = True) -> list[Query]:
    out = []
    for item, demos in zip(task.items, demo_lists):
        d = fit_demos(task, item, demos[:k], tok, block_size, _reserve(task, item, tok), description)
        out.append(Query(item, d, prompt_prefix(task, item, d, description)))
    return out


# ----- scoring -------------------------------------------------------------------------------------
def _score_choices_gpt(model, tok, task: Task, queries: list[Query], batch_size: int, bar) -> list[list[tuple[float, int]]]:
    from gptlab.evals.perplexity import score_continuations
    ctxs, conts, owner = [], [], []
    for qi, q in enumerate(queries):
        for c in q.item.choices:
            if task.kind == "mc":
                ctx, cont = q.prefix + q.item.prompt, c
            else:  # blank: the whole query line is the continuation
                ctx, cont = q.prefix, q.item.prompt + c + q.item.right
            ctxs.append([tok.eot_id] + tok.encode(ctx))
            conts.append(tok.encode(cont))
            owner.append(qi)
    scores = score_continuations(model, ctxs, conts, batch_size=batch_size)
    out: list[list[tuple[float, int]]] = [[] for _ in queries]
    for qi, s in zip(owner, scores):
        out[qi].append(s)
    bar.update(len(queries))
    return out


def _score_choices_bert(model, tok, task: Task, queries: list[Query], batch_size: int, bar) -> list[list[tuple[float, int]]]:
    from gptlab.evals.fill import _mask_id, pseudo_loglik
    mask = _mask_id(tok)
    out = []
    for q in queries:
        left = [tok.eot_id] + tok.encode(q.prefix + q.item.prompt)
        right = tok.encode(q.item.right) if q.item.right else []
        reqs = []
        for c in q.item.choices:
            ids = tok.encode(c)
            reqs.append((left + ids + right, list(range(len(left), len(left) + len(ids)))))
        out.append(list(zip(pseudo_loglik(model, mask, reqs, batch_size), [len(r[1]) for r in reqs])))
        bar.update(1)
    return out


def _gold_logprobs(model, tok, queries: list[Query], prompts: list[list[int]],
                   batch_size: int) -> list[tuple[float, int]]:
    """(summed log-prob, tokens) of each query's right answer as the continuation of its prompt."""
    from gptlab.evals.perplexity import score_continuations
    return score_continuations(model, prompts, [tok.encode(q.item.answer) for q in queries], batch_size=batch_size)


def _generate(model, tok, task: Task, prompts: list[list[int]], batch_size: int, bar) -> list[str]:
    from gptlab.generate.engine import Engine, SamplingParams
    engine = Engine(model, tok)
    params = SamplingParams(max_new_tokens=gen_budget(task, tok), temperature=0, stop=["\n"])
    texts = []
    for a in range(0, len(prompts), batch_size):
        chunk = prompts[a:a + batch_size]
        texts.extend(c.text for c in engine.generate(chunk, params))
        bar.update(len(chunk))
    return texts


def _vocab_top1(model, tok, queries: list[Query]) -> float | None:
    """Blank tasks: share of queries whose word is the model's single most likely token over the whole
    vocabulary (BERT: at a mask with both sides visible; GPT: next token after the left side only)."""
    import torch
    from gptlab.evals.fill import masked_logprobs, _crop, _mask_id
    hits, n = 0, 0
    for q in queries:
        word = tok.encode(q.item.answer)
        if len(word) != 1:
            continue
        left = [tok.eot_id] + tok.encode(q.prefix + q.item.prompt)
        if model.config.causal:
            left = left[-model.config.block_size:]
            with torch.inference_mode():
                logits = model.lm_logits(model.hidden(torch.tensor([left], device=next(model.parameters()).device))[:, -1])
            pred = int(logits[0, :tok.vocab_size].argmax())
        else:
            ids, pos = _crop(left + [_mask_id(tok)] + tok.encode(q.item.right), [len(left)], model.config.block_size)
            pred = int(masked_logprobs(model, [ids], pos)[0, :tok.vocab_size].argmax())
        hits += pred == word[0]
        n += 1
    return hits / n if n else None


def evaluate_task(model, tok, task: Task, shots: list[int], seed: int = 0, normalize: bool = True,
                  description: bool = True, batch_size: int = 32, show_progress: bool = True,
                  label: str = "") -> tuple[dict, list[dict]]:
    """{str(k): metrics} for one task and the per-query predictions."""
    is_bert = not model.config.causal
    if is_bert and task.kind == "gen":
        raise GptlabError(f"task {task.name} needs generation, which a BERT run cannot do "
                          f"(BERT runs take multiple-choice and blank tasks: cloze, blank, JSONL choices)")
    demo_lists = choose_demos(task, max(shots), seed)
    results, preds = {}, []
    for k in shots:
        queries = make_queries(task, k, demo_lists, tok, model.config.block_size, description)
        with tqdm(total=len(queries), desc=f"{label}{task.name} k={k}", unit="q",
                  disable=not show_progress, leave=False) as bar:
            if task.kind == "gen":
                prompts = [[tok.eot_id] + tok.encode(q.prefix + q.item.prompt) for q in queries]
                outs = _generate(model, tok, task, prompts, batch_size, bar)
                hits = [o.strip() == q.item.answer.strip() for o, q in zip(outs, queries)]
                # A graded view beside exact match: how likely the model finds the right answer. It
                # shows in-context learning before greedy answers become exactly right.
                gold = _gold_logprobs(model, tok, queries, prompts, batch_size)
                extra: dict = {"gold_prob": sum(math.exp(lp) for lp, _ in gold) / len(gold),
                               "gold_logprob_per_token": sum(lp / n for lp, n in gold) / len(gold)}
                rows = [{"prediction": o, "gold_logprob": round(lp, 4)} for o, (lp, _) in zip(outs, gold)]
            else:
                scorer = _score_choices_bert if is_bert else _score_choices_gpt
                scores = scorer(model, tok, task, queries, batch_size, bar)
                raw = [max(range(len(s)), key=lambda i: s[i][0]) for s in scores]
                norm = [max(range(len(s)), key=lambda i: s[i][0] / s[i][1]) for s in scores]
                # A blank's choices are whole lines: rank them by the line's likelihood, never per token.
                chosen = norm if (normalize and task.kind == "mc") else raw
                hits = [c == q.item.label for c, q in zip(chosen, queries)]
                extra = {"acc_raw": sum(r == q.item.label for r, q in zip(raw, queries)) / len(queries),
                         "acc_norm": sum(r == q.item.label for r, q in zip(norm, queries)) / len(queries)}
                if task.kind == "blank":   # per-token means mean nothing for whole lines
                    extra.pop("acc_norm")
                    extra["acc_vocab_top1"] = _vocab_top1(model, tok, queries)
                rows = [{"prediction": q.item.choices[c], "logprobs": [round(x[0], 4) for x in s]}
                        for c, q, s in zip(chosen, queries, scores)]
        correct = sum(hits)
        lo, hi = wilson_interval(correct, len(queries))
        results[str(k)] = {"acc": correct / len(queries), "ci95": [lo, hi], "correct": correct,
                           "n": len(queries), "shots_used": sum(len(q.demos) for q in queries) / len(queries),
                           **extra}
        for q, hit, row in zip(queries, hits, rows):
            preds.append({"task": task.name, "k": k, "key": q.item.key, "prompt": q.prefix + q.item.prompt,
                          "answer": q.item.answer, "correct": bool(hit), **row})
    return results, preds
