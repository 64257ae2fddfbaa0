"""`gptlab eval-tools RUN --items tools_heldout.jsonl --index INDEX`: the same model with and without tools.

For each held-out item of the tool families (``gptlab data instruct --tools``) the model answers twice,
greedily: once with the item's tools shown and run (the calculator; search over INDEX, an index of
documents that never reached training), once with no tools at all. Scored per family:

* calc, lookup, no_tool: the answer is right (calc, no_tool: ``check_answer``; lookup: the fact is in
  the reply). Without tools a lookup question can only be answered by guessing.
* funcs: the reply is a call of the requested function whose arguments are JSON matching its schema
  with exactly the values asked for (a client-side function: it is not run, the call itself is scored).
"""
from __future__ import annotations

from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.evals.stats import wilson_interval


def _right(item: dict, turn) -> bool:
    from gptlab.data.instruct import check_answer
    from gptlab.tools import argument_problems
    reply = turn.new[-1]["content"] if turn.new else ""
    if item["family"] == "funcs":
        call = turn.pending
        spec = next((t for t in item.get("tools", []) if call is not None and t["name"] == call.name), None)
        return (spec is not None and call.name == item["call"]["name"] and call.arguments == item["call"]["arguments"]
                and not argument_problems(spec["parameters"], call.arguments))
    if item["family"] == "lookup":
        return str(item["answer"]).lower() in reply.lower()
    return check_answer({**item, "family": "arithmetic" if item["family"] == "calc" else item["family"]}, reply)


def evaluate_tools(model, tok, items: list[dict], toolbox, max_new_tokens: int = 64, max_calls: int = 3,
                   batch_size: int = 32) -> dict:
    """{"with": {family: [0/1]}, "without": {family: [0/1]}, "examples": [...]} over ``items``."""
    from gptlab.generate.engine import Engine, SamplingParams
    from gptlab.generate.tool_loop import ToolTurn
    engine = Engine(model, tok)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    budget = max(8, model.config.block_size - max_new_tokens)
    out = {"with": {}, "without": {}, "examples": []}
    for mode in ("with", "without"):
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            turns = []
            for it in chunk:
                tools = it.get("tools") if mode == "with" else None
                turns.append(ToolTurn(tok, it["messages"], tools, toolbox if tools else None, max_calls, budget))
            engine.answer_with_tools(turns, params)
            for it, t in zip(chunk, turns):
                if mode == "without" and it["family"] == "funcs":
                    continue   # a function the model is not shown cannot be called
                ok = _right(it, t)
                out[mode].setdefault(it["family"], []).append(int(ok))
                if len(out["examples"]) < 40 and start == 0:
                    out["examples"].append({"mode": mode, "family": it["family"], "id": it["id"], "right": ok,
                                            "calls": [{"name": c.name, "arguments": c.arguments, "result": c.result}
                                                      for c in t.calls],
                                            "reply": t.new[-1]["content"] if t.new else ""})
    return out


def summarize(scores: dict) -> dict:
    table = {}
    for fam in sorted(set(scores["with"]) | set(scores["without"])):
        row = {}
        for mode in ("with", "without"):
            v = scores[mode].get(fam)
            if v:
                lo, hi = wilson_interval(sum(v), len(v))
                row[mode] = {"accuracy": sum(v) / len(v), "n": len(v), "ci95": [lo, hi]}
        table[fam] = row
    return table


def format_table(table: dict) -> str:
    lines = ["| family | with tools | without tools |", "|---|---|---|"]
    for fam, row in table.items():
        cells = []
        for mode in ("with", "without"):
            r = row.get(mode)
            cells.append(f"{r['accuracy']:.1%} ({round(r['accuracy'] * r['n'])}/{r['n']}, 95% CI "
                         f"{r['ci95'][0]:.0%}-{r['ci95'][1]:.0%})" if r else "-")
        lines.append(f"| {fam} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def run(args) -> int:
    from gptlab.data.formats import load_prompt_items
    from gptlab.device import pick_device
    from gptlab.io import atomic_write_json
    from gptlab.runs import load_run
    from gptlab.tokenizer.chat_template import require_chat_tokens
    from gptlab.tools import builtin_toolbox
    toolbox = builtin_toolbox(["calculator"] + (["search"] if args.index else []), args.index)
    items = load_prompt_items(args.items)
    bad = [i for i, it in enumerate(items) if "family" not in it or "answer" not in it]
    if bad:
        raise GptlabError(f"{args.items}: item {bad[0] + 1} has no \"family\"/\"answer\" (use tools_heldout.jsonl "
                          "from `gptlab data instruct --tools`)")
    if args.n:
        items = items[: args.n]
    if any(it["family"] == "lookup" for it in items) and not args.index:
        raise GptlabError("lookup items need --index (an index of the held-out documents: "
                          "`gptlab index CURRICULUM/tool_docs/heldout --out INDEX`)")
    model, tok, _ = load_run(args.run_dir, pick_device(args.device))
    require_chat_tokens(tok, args.run_dir)
    scores = evaluate_tools(model, tok, items, toolbox, args.max_new_tokens)
    table = summarize(scores)
    print(format_table(table))
    if args.out:
        atomic_write_json(Path(args.out), {"run": str(args.run_dir), "items": str(args.items), "index": args.index,
                                           "table": table, "examples": scores["examples"]})
        print(f"wrote {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval-tools", help="held-out accuracy of a run with and without tools",
                       description="Answer the held-out tool items (tools_heldout.jsonl from `gptlab data instruct "
                       "--tools`) twice, with the tools shown and run and with none, and print per-family accuracy "
                       "with 95% intervals.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--items", required=True, help="tools_heldout.jsonl")
    p.add_argument("--index", default=None, help="search index of the held-out documents (gptlab index)")
    p.add_argument("--n", type=int, default=None, help="first N items only")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="write the table and example answers as JSON")
    p.set_defaults(func=run)
