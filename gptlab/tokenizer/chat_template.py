"""The chat template: how system/user/assistant turns become token ids.

Each turn is wrapped in its role's reserved start/end tokens:

    <|system_start|>You are helpful.<|system_end|><|user_start|>Hi<|user_end|><|assistant_start|>Hello!<|assistant_end|>

A prompt for generation ends with ``<|assistant_start|>``; the model answers and stops at
``<|assistant_end|>`` (end of turn). Content is encoded as plain text, so a user typing a special-token
string cannot forge a turn boundary. For SFT the loss mask covers assistant content and the
assistant-end token only (the model must learn to stop, not to predict what the user says).

The same template is exported as a Jinja string (``CHAT_TEMPLATE_JINJA``) for Hugging Face tokenizers.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

from gptlab.data.formats import TRANSCRIPT_NAMES, render_transcript
from gptlab.errors import GptlabError
from gptlab.tokenizer import (ASSISTANT_END, ASSISTANT_START, SYSTEM_END, SYSTEM_START, USER_END,
                              USER_START, Tokenizer)

ROLES = {
    "system": (SYSTEM_START, SYSTEM_END),
    "user": (USER_START, USER_END),
    "assistant": (ASSISTANT_START, ASSISTANT_END),
}

CHAT_TEMPLATE_JINJA = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '_start|>' + message['content'] + '<|' + message['role'] + '_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant_start|>' }}{% endif %}"
)


def _role_ids(tok: Tokenizer, role: str) -> tuple[int, int]:
    if role not in ROLES:
        raise GptlabError(f"unknown role {role!r} (expected system, user or assistant)")
    start, end = (tok.special_id(t) for t in ROLES[role])
    if start is None or end is None:
        raise GptlabError("this tokenizer has no chat tokens; train one with `gptlab tokenizer train`")
    return start, end


def has_chat_tokens(tok: Tokenizer) -> bool:
    return all(tok.special_id(t) is not None for t in (USER_START, USER_END, ASSISTANT_START, ASSISTANT_END))


def require_chat_tokens(tok: Tokenizer, run_dir) -> None:
    """Chat needs the role tokens; imported GPT-2 tokenizers do not have them."""
    if not has_chat_tokens(tok):
        raise GptlabError(f"{run_dir}: the tokenizer has no chat tokens (<|user_start|> ...); re-import with "
                          "`gptlab import HF_DIR --out RUN --add-chat-tokens` and fine-tune with `gptlab sft`")


def validate_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise GptlabError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise GptlabError(f"message {i} must be {{'role': system|user|assistant, 'content': str}}")
        if m["role"] == "system" and i != 0:
            raise GptlabError(f"message {i}: a system message may only come first")
    return messages


def render(tok: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Ids of a whole conversation and a 0/1 mask marking the tokens an SFT loss should train on."""
    ids: list[int] = []
    mask: list[int] = []
    for m in validate_messages(messages):
        start, end = _role_ids(tok, m["role"])
        body = tok.encode(m["content"])
        train = 1 if m["role"] == "assistant" else 0
        ids += [start] + body + [end]
        mask += [0] + [train] * len(body) + [train]
    return ids, mask


def render_prompt(tok: Tokenizer, messages: list[dict]) -> list[int]:
    """Ids of the conversation so far plus ``<|assistant_start|>``: what generation continues."""
    ids, _ = render(tok, messages)
    return ids + [_role_ids(tok, "assistant")[0]]


def end_of_turn_id(tok: Tokenizer) -> int:
    return _role_ids(tok, "assistant")[1]


@dataclass
class FittedPrompt:
    ids: list[int]
    messages: list[dict]
    dropped: int          # how many of the oldest non-system turns were left out


def fit_prompt(tok: Tokenizer, messages: list[dict], max_tokens: int) -> FittedPrompt:
    """Drop the oldest turns (keeping a leading system message) until the prompt fits ``max_tokens``.

    Raises GptlabError when even the last message alone (with the system message) does not fit.
    Linear: turns are encoded newest first, each once, and a turn too long to fit in what room is left
    (judged by its length, see ``max_token_chars``) is not encoded at all, so a huge conversation costs
    about as much as the part of it that fits.
    """
    messages = validate_messages(messages)
    system = messages[:1] if messages[0]["role"] == "system" else []
    rest = messages[len(system):]
    widest = max_token_chars(tok)
    start_id = _role_ids(tok, "assistant")[0]
    head = render(tok, system)[0] if system else []
    room = max_tokens - len(head) - 1   # the closing <|assistant_start|>
    kept: list[list[int]] = []
    for m in reversed(rest):
        start, end = _role_ids(tok, m["role"])
        # Each token stands for at most `widest` characters: a longer text needs more tokens than fit.
        if room < 2 or len(m["content"]) > (room - 2) * widest:
            break
        ids = [start] + tok.encode(m["content"]) + [end]
        if len(ids) > room:
            break
        kept.append(ids)
        room -= len(ids)
    if not kept:
        raise GptlabError(f"the last message does not fit in the context window ({max_tokens} tokens)")
    dropped = len(rest) - len(kept)
    ids = head + [i for turn in reversed(kept) for i in turn] + [start_id]
    return FittedPrompt(ids, system + rest[dropped:], dropped)


_WIDEST: "weakref.WeakKeyDictionary[Tokenizer, int]" = weakref.WeakKeyDictionary()


def max_token_chars(tok: Tokenizer) -> int:
    """An upper bound on the characters one token of ``tok`` stands for (its longest vocabulary entry:
    a byte-level entry holds one character per byte, and a byte decodes to at most one character)."""
    if tok not in _WIDEST:
        _WIDEST[tok] = max((len(t) for i in range(tok.vocab_size) if (t := tok.id_to_token(i))), default=1)
    return _WIDEST[tok]


def parse_reply(tok: Tokenizer, ids: list[int]) -> str:
    """Text of generated ids up to (not including) the end-of-turn token."""
    end = end_of_turn_id(tok)
    if end in ids:
        ids = ids[: ids.index(end)]
    return tok.decode(ids, skip_special=True)


# ----- a plain-text transcript, for models that never saw the template --------------------------------
def transcript_prompt(tok: Tokenizer, messages: list[dict], demos: list[list[dict]], max_tokens: int) -> list[int]:
    """Ids of ``demos`` (whole conversations, k-shot demonstrations) then ``messages``, each a transcript
    separated by a blank line, ending with ``Assistant:`` for the model to continue; the answer ends at
    the next newline. The oldest demonstrations are dropped until the prompt fits ``max_tokens``."""
    query = render_transcript(messages) + TRANSCRIPT_NAMES["assistant"] + ":"
    shots = [render_transcript(d) for d in demos]
    while True:
        ids = [tok.eot_id] + tok.encode("\n".join(shots + [query]))
        if len(ids) <= max_tokens:
            return ids
        if not shots:
            raise GptlabError(f"the prompt does not fit in the context window ({max_tokens} tokens)")
        shots = shots[1:]
