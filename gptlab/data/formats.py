"""The JSONL formats every InstructGPT stage reads, validated line by line.

* conversations (SFT demonstrations): ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``;
  with tools, ``"tools": [function definitions]``, assistant turns may carry
  ``"tool_calls": [{"name": str, "arguments": {...}}]`` and ``{"role": "tool", "content": result}`` turns follow
* prompts (RM labelling, PPO): ``{"prompt": str}`` or ``{"messages": [...]}`` ending with a user turn
* rankings (RM): ``{"prompt": str|messages, "responses": [r0, ..., rK-1], "ranking": [best, ..., worst]}``,
  optionally ``"ties": [[i, j], ...]``: pairs judged equally good, which carry no comparison
* pairs (TRL's preference format): ``{"prompt": str|messages, "chosen": str, "rejected": str}``

Loaders read the whole file before returning, so a typo on line 9,000 stops a command before any
training starts, and every error names ``file:line`` and what is wrong. Fields beyond the ones above
(``id``, ``family``, ``answer``...) are kept as metadata: the curriculum and the labeler use them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from itertools import combinations

from gptlab.errors import GptlabError
from gptlab.io import iter_jsonl

ROLES = ("system", "user", "assistant", "tool")
MIN_K, MAX_K = 2, 9   # InstructGPT's labelers ranked 4 to 9 responses; a pair is the smallest ranking
FORMATS = ("conversations", "prompts", "rankings", "pairs")


@dataclass
class Ranking:
    """K responses to one prompt, ordered by a labeler: ``ranking[0]`` indexes the best response."""
    prompt: list[dict]
    responses: list[str]
    ranking: list[int]
    meta: dict = field(default_factory=dict)
    # Pairs of response indices the labeler judged equally good: they say nothing about preference,
    # so training and the pairwise accuracy leave them out (the ranking still orders them somehow).
    ties: frozenset = frozenset()

    @property
    def k(self) -> int:
        return len(self.responses)


# ----- a plain-text transcript ---------------------------------------------------------------------------
TRANSCRIPT_NAMES = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


def _transcript_text(m: dict) -> str:
    calls = " ".join(f"[{c['name']} {json.dumps(c['arguments'], ensure_ascii=False)}]" for c in m.get("tool_calls", []))
    return " ".join((m["content"] + " " + calls).split())


def render_transcript(messages: list[dict]) -> str:
    """A conversation as plain ``Role: content`` lines: how a model that never saw the reserved chat
    tokens is asked (GPT-3 style, before InstructGPT), and how conversations enter a pre-training corpus."""
    return "".join(f"{TRANSCRIPT_NAMES[m['role']]}: {_transcript_text(m)}\n"
                   for m in check_messages(messages, "transcript"))


def check_tool_calls(calls, where: str) -> list[dict]:
    """An assistant turn's ``tool_calls``: a non-empty list of {"name": str, "arguments": object}."""
    if not isinstance(calls, list) or not calls:
        raise GptlabError(f"{where}: \"tool_calls\" must be a non-empty list")
    for j, c in enumerate(calls):
        if not (isinstance(c, dict) and isinstance(c.get("name"), str) and c["name"]
                and isinstance(c.get("arguments"), dict)):
            raise GptlabError(f"{where}: tool call {j} must be {{\"name\": str, \"arguments\": {{...}}}}")
    return [{"name": c["name"], "arguments": c["arguments"]} for c in calls]


# ----- field checks (``where`` is "file:line") ------------------------------------------------------
def check_messages(messages, where: str, last: str | None = None, need_assistant: bool = False) -> list[dict]:
    """Validate a messages list; ``last`` requires the final role (prompts end with the user's turn)."""
    if not isinstance(messages, list) or not messages:
        raise GptlabError(f"{where}: \"messages\" must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise GptlabError(f"{where}: message {i} must be an object with \"role\" and \"content\"")
        if m.get("role") not in ROLES:
            raise GptlabError(f"{where}: message {i} has role {m.get('role')!r} (expected system, user, assistant or tool)")
        if not isinstance(m.get("content"), str):
            raise GptlabError(f"{where}: message {i} needs a string \"content\"")
        if m["role"] == "system" and i != 0:
            raise GptlabError(f"{where}: message {i}: a system message may only come first")
    if messages[0]["role"] == "system" and len(messages) == 1:
        raise GptlabError(f"{where}: only a system message; add the conversation after it")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise GptlabError(f"{where}: no assistant turn (SFT learns from assistant turns)")
    if last is not None and messages[-1]["role"] != last:
        raise GptlabError(f"{where}: the last message must be a {last} turn, not {messages[-1]['role']}")
        if m.get("tool_calls") is not None and m["role"] != "assistant":
            raise GptlabError(f"{where}: message {i}: only an assistant turn makes tool calls")
    # Drop extra keys so downstream code sees exactly role/content (and an assistant's tool calls).
    return [{"role": m["role"], "content": m["content"]}
            | ({"tool_calls": check_tool_calls(m["tool_calls"], f"{where}: message {i}")} if m.get("tool_calls") else {})
            for m in messages]


def _prompt_field(row: dict, where: str, key: str = "prompt") -> list[dict]:
    """A prompt given as a string (one user turn) or as messages ending with a user turn."""
    value = row.get(key)
    if isinstance(value, str):
        if not value.strip():
            raise GptlabError(f"{where}: \"{key}\" is empty")
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return check_messages(value, where, last="user")
    if value is None:
        raise GptlabError(f"{where}: missing \"{key}\"")
    raise GptlabError(f"{where}: \"{key}\" must be a string or a messages list")


def _response_field(row: dict, key: str, where: str) -> str:
    """A response: a string, or (TRL's conversational form) a list with one assistant message."""
    value = row.get(key)
    if isinstance(value, str):
        return value
    if (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str)):
        return value[0]["content"]
    if value is None:
        raise GptlabError(f"{where}: missing \"{key}\"")
    raise GptlabError(f"{where}: \"{key}\" must be a string (or [{{\"role\": \"assistant\", \"content\": str}}])")


def _meta(row: dict, used: tuple[str, ...]) -> dict:
    return {k: v for k, v in row.items() if k not in used}


def _rows(path) -> list[tuple[str, dict]]:
    rows = [(f"{path}:{i}", obj) for i, obj in iter_jsonl(path)]
    if not rows:
        raise GptlabError(f"{path}: no records (the file is empty)")
    return rows


# ----- one record of each format ----------------------------------------------------------------------
def parse_conversation(row: dict, where: str) -> dict:
    if "messages" not in row:
        raise GptlabError(f"{where}: missing \"messages\" (conversations are {{\"messages\": [...]}})")
    out = {**row, "messages": check_messages(row["messages"], where, need_assistant=True)}
    if row.get("tools") is not None:
        from gptlab.tools import check_spec
        if not isinstance(row["tools"], list):
            raise GptlabError(f"{where}: \"tools\" must be a list of function definitions")
        out["tools"] = [check_spec(t, f"{where}: tools[{i}]") for i, t in enumerate(row["tools"])]
    return out


def parse_prompt(row: dict, where: str) -> dict:
    """A prompt record normalised to ``{"messages": [...], **metadata}`` (messages end with a user turn)."""
    if "messages" in row:
        messages = check_messages(row["messages"], where, last="user")
    elif "prompt" in row:
        messages = _prompt_field(row, where)
    else:
        raise GptlabError(f"{where}: needs \"prompt\" (a string) or \"messages\" (ending with a user turn)")
    return {**_meta(row, ("prompt", "messages")), "messages": messages}


def parse_ranking(row: dict, where: str) -> Ranking:
    prompt = _prompt_field(row, where)
    responses = row.get("responses")
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise GptlabError(f"{where}: \"responses\" must be a list of strings")
    k = len(responses)
    if not MIN_K <= k <= MAX_K:
        raise GptlabError(f"{where}: {k} responses; a ranking needs between {MIN_K} and {MAX_K}")
    ranking = row.get("ranking")
    if (not isinstance(ranking, list) or not all(type(r) is int for r in ranking)
            or sorted(ranking) != list(range(k))):
        raise GptlabError(f"{where}: \"ranking\" must list each response index 0..{k - 1} once, best first "
                          f"(got {ranking!r})")
    ties = row.get("ties", [])
    if (not isinstance(ties, list)
            or not all(isinstance(t, list) and len(t) == 2 and all(type(i) is int and 0 <= i < k for i in t)
                       and t[0] != t[1] for t in ties)):
        raise GptlabError(f"{where}: \"ties\" must be a list of [i, j] pairs of different response indices "
                          f"0..{k - 1} (got {ties!r})")
    return Ranking(prompt, list(responses), list(ranking), _meta(row, ("prompt", "responses", "ranking", "ties")),
                   ties=frozenset(frozenset(t) for t in ties))


def parse_pair(row: dict, where: str) -> Ranking:
    """TRL's {prompt, chosen, rejected} as a K=2 ranking: response 0 is chosen, and it ranks first."""
    prompt = _prompt_field(row, where)
    chosen = _response_field(row, "chosen", where)
    rejected = _response_field(row, "rejected", where)
    return Ranking(prompt, [chosen, rejected], [0, 1], _meta(row, ("prompt", "chosen", "rejected")))


def record_format(row: dict) -> str | None:
    """Which format one record is in, judged by its keys (None when it matches none)."""
    if "responses" in row or "ranking" in row:
        return "rankings"
    if "chosen" in row or "rejected" in row:
        return "pairs"
    if isinstance(row.get("messages"), list) and row["messages"]:
        last = row["messages"][-1]
        return "conversations" if isinstance(last, dict) and last.get("role") == "assistant" else "prompts"
    if "prompt" in row:
        return "prompts"
    return None


# ----- whole files ------------------------------------------------------------------------------------
def detect_format(path: str | os.PathLike) -> str:
    """'conversations', 'prompts', 'rankings' or 'pairs', from the first record (the loaders check all)."""
    where, row = _rows(path)[0]
    fmt = record_format(row)
    if fmt is None:
        raise GptlabError(f"{where}: not a known format (expected keys messages, prompt, responses+ranking "
                          f"or chosen+rejected; got {sorted(row)})")
    return fmt


def load_conversations(path: str | os.PathLike) -> list[dict]:
    """Conversation records ``{"messages": [...], **metadata}``; each has at least one assistant turn."""
    return [parse_conversation(row, where) for where, row in _rows(path)]


def load_prompt_items(path: str | os.PathLike) -> list[dict]:
    """Prompt records with their metadata: ``{"messages": [... user turn], "family": ..., ...}``."""
    return [parse_prompt(row, where) for where, row in _rows(path)]


def load_prompts(path: str | os.PathLike) -> list[list[dict]]:
    """Just the prompts, each a messages list ending with a user turn."""
    return [item["messages"] for item in load_prompt_items(path)]


def load_preferences(path: str | os.PathLike) -> list[Ranking]:
    """Rankings and/or pairs (a pair is a K=2 ranking), mixed freely line by line."""
    out = []
    for where, row in _rows(path):
        fmt = record_format(row)
        if fmt == "rankings":
            out.append(parse_ranking(row, where))
        elif fmt == "pairs":
            out.append(parse_pair(row, where))
        else:
            raise GptlabError(f"{where}: not a preference record (needs prompt + responses + ranking, "
                              f"or prompt + chosen + rejected)")
    return out


def expand_pairs(ranking: Ranking | list[int]) -> list[tuple[int, int]]:
    """All C(K,2) (winner_index, loser_index) comparisons implied by a best-to-worst ranking."""
    order = ranking.ranking if isinstance(ranking, Ranking) else list(ranking)
    return [(w, l) for w, l in combinations(order, 2)]


def ranking_row(prompt: list[dict], responses: list[str], ranking: list[int], **meta) -> dict:
    """A record in the rankings format (what ``gptlab label`` writes)."""
    return {"prompt": prompt, "responses": list(responses), "ranking": list(ranking), **meta}
