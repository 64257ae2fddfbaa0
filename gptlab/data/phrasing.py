"""How people ask: many wordings of each curriculum request, casual forms and typos.

A model trained on six fixed templates answers those six and little else. People write "59+63=?",
"whats 59 plus 63", "add 59 and 63 pls", "59加63等于多少" or "Chinese for cat?". The curriculum
(gptlab.data.instruct) draws each request's wording from the lists below and then roughens it the way
people type: lower case, no final punctuation, a dropped or swapped letter in a template word, a
"please". Typos only touch the template's own words, never the payload (a number, the word to reverse),
so the right answer stays the same.

Held-out evaluation (gptlab.evals.exam) asks with wordings written separately from these lists, so
its score says how well the model reads requests it was never shown, not how well it memorised ours.
"""
from __future__ import annotations

import random
import re

# ----- arithmetic: {a} and {b} are the operands; the reply restates the problem canonically --------
ADD = (
    "What is {a} + {b}?", "What's {a} plus {b}?", "whats {a} plus {b}", "{a}+{b}=?", "{a} + {b} = ?", "{a} + {b}",
    "{a}+{b}", "{a} plus {b}?", "Add {a} and {b}.", "add {a} and {b}", "Add {b} to {a}.", "Compute {a} + {b}.",
    "Calculate {a} + {b}.", "calculate {a}+{b}", "What is the sum of {a} and {b}?", "sum of {a} and {b}?",
    "How much is {a} plus {b}?", "What does {a} + {b} equal?", "What do you get when you add {a} and {b}?",
    "Please work out {a} + {b}.", "Can you add {a} and {b} for me?", "Tell me {a} plus {b}.",
    "{a} and {b} added together?", "What is {a} added to {b}?", "Work out {a}+{b} please",
    "I have {a} apples and buy {b} more. How many apples do I have?", "{a} plus {b} equals what?",
    "{a}加{b}等于多少？", "{a}加{b}是多少", "计算{a}+{b}", "{a}+{b}等于几？", "Solve: {a} + {b}", "{a} + {b} is?",
)
SUB = (
    "What is {a} - {b}?", "What's {a} minus {b}?", "whats {a} minus {b}", "{a}-{b}=?", "{a} - {b} = ?", "{a} - {b}",
    "{a}-{b}", "{a} minus {b}?", "Subtract {b} from {a}.", "subtract {b} from {a}", "Take {b} away from {a}.",
    "What is {a} take away {b}?", "Compute {a} - {b}.", "Calculate {a} - {b}.", "calculate {a}-{b}",
    "How much is {a} minus {b}?", "What does {a} - {b} equal?", "What do you get if you subtract {b} from {a}?",
    "What is the difference between {a} and {b}?", "Please work out {a} - {b}.", "Tell me {a} minus {b}.",
    "What is {a} less {b}?", "{a} take away {b}?", "I had {a} sweets and ate {b}. How many are left?",
    "{a} minus {b} equals what?", "{a}减{b}等于多少？", "{a}减{b}是多少", "计算{a}-{b}", "{a}-{b}等于几？",
    "Solve: {a} - {b}", "{a} - {b} is?", "Can you subtract {b} from {a}?",
)
MUL = (
    "What is {a} * {b}?", "What's {a} times {b}?", "{a}*{b}=?", "{a} x {b}?", "{a} times {b}", "Multiply {a} by {b}.",
    "multiply {a} and {b}", "What is the product of {a} and {b}?", "Compute {a} * {b}.", "How much is {a} times {b}?",
    "{a}乘以{b}等于多少？", "{a}乘{b}是多少", "Calculate {a} * {b}.",
)
ARITH = {"+": ADD, "-": SUB, "*": MUL}

# ----- follow-ups to a previous answer: {c} is the operand ---------------------------------------------
FOLLOW = {
    "double": ("And double that?", "Double it.", "double it", "Now double it.", "What's twice that?", "Twice that?",
               "Multiply that by 2.", "times 2?", "And if you double it?", "再乘以2呢？", "翻倍是多少？"),
    "add": ("Now add {c} to that.", "Add {c}.", "add {c} to it", "plus {c}?", "And {c} more?", "+{c}?",
            "What if you add {c}?", "Now add {c}.", "再加{c}呢？", "Add {c} to the answer."),
    "sub": ("And subtract {c} from that?", "Subtract {c}.", "minus {c}?", "Take away {c}.", "now take {c} off",
            "-{c}?", "What if you subtract {c}?", "再减{c}呢？", "Subtract {c} from the answer."),
    "half": ("What is half of that?", "Half of that?", "Halve it.", "halve that", "Divide it by 2.", "What's half of it?",
             "And half of that?", "再除以2呢？"),
    "mul": ("Multiply that by {c}.", "times {c}?", "Now multiply it by {c}.", "And times {c}?", "x{c}?",
            "What if you multiply it by {c}?", "再乘以{c}呢？"),
}

# ----- string edits: {w} is the word, quoted by the caller's choice ------------------------------------
REVERSE = ("Reverse the word {w}.", "Write {w} backwards.", "Spell {w} backwards.", "What is {w} spelled backwards?",
           "{w} backwards?", "Reverse {w}.", "reverse {w}", "Can you reverse {w}?", "What's {w} reversed?",
           "Flip the letters of {w}.", "Read {w} from right to left.", "reverse: {w}", "{w} reversed?",
           "Write the word {w} in reverse.", "把{w}倒过来写", "{w}倒过来是什么？")
UPPER = ("Write {w} in uppercase.", "Convert {w} to capital letters.", "Make {w} all caps.", "{w} in capitals?",
         "uppercase {w}", "Uppercase: {w}", "Change {w} to upper case.", "Put {w} in capital letters.",
         "Can you write {w} in caps?", "{w} in upper case please", "把{w}改成大写", "{w}的大写是什么？")
COUNT = ("How many times does the letter {c} appear in {w}?", "Count the letter {c} in {w}.", "How many {c}s are in {w}?",
         "how many {c} in {w}?", "Number of {c} letters in {w}?", "How many {c}'s does {w} have?",
         "Count how many {c}s there are in {w}.", "In {w}, how many times does {c} occur?", "{w}里有几个{c}？",
         "How often does {c} appear in {w}?")
FIRST = ("What is the first letter of {w}?", "What letter does {w} start with?", "first letter of {w}?",
         "Which letter comes first in {w}?", "What does {w} begin with?", "{w} starts with which letter?",
         "Give me the first letter of {w}.", "{w}的第一个字母是什么？", "Tell me the initial letter of {w}.")
LAST = ("What is the last letter of {w}?", "What letter does {w} end with?", "last letter of {w}?",
        "Which letter comes last in {w}?", "{w}的最后一个字母是什么？", "Give me the final letter of {w}.")
SORT = ("Sort these words alphabetically: {l}.", "Put these words in alphabetical order: {l}.",
        "alphabetize: {l}", "Order these words from A to Z: {l}.")

# ----- translation ------------------------------------------------------------------------------------
TO_CHINESE = ("Translate {en} into Chinese.", "What is {en} in Chinese?", "How do you say {en} in Chinese?",
              "Chinese for {en}?", "chinese for {en}", "What's the Chinese word for {en}?", "{en} in Chinese?",
              "how do i say {en} in chinese", "Give me the Chinese for {en}.", "translate to chinese: {en}",
              "What is the Chinese translation of {en}?", "Say {en} in Chinese.", "{en}用中文怎么说？",
              "{en}的中文是什么？", "In Chinese, what is {en}?", "Translate into Chinese: {en}")
TO_ENGLISH = ("Translate {zh} into English.", "What does {zh} mean in English?", "What is {zh} in English?",
              "{zh} in English?", "English for {zh}?", "What does {zh} mean?", "{zh}是什么意思？", "{zh}用英语怎么说？",
              "What's the English word for {zh}?", "translate {zh}", "Meaning of {zh}?", "{zh} means what?",
              "How do you say {zh} in English?", "{zh}的英文是什么？")

# Wrappers for a word inside a request: quotes of several kinds, or none.
QUOTES = ("'{}'", "'{}'", '"{}"', "{}", "{}", "“{}”", "`{}`")

_TYPO_WORD = re.compile(r"(?<![{\w])([A-Za-z]{4,})(?![}\w])")


def quote(word: str, rng: random.Random) -> str:
    return rng.choice(QUOTES).format(word)


def _typo(word: str, rng: random.Random) -> str:
    i = rng.randrange(1, len(word) - 1)
    kind = rng.randrange(3)
    if kind == 0:
        return word[:i] + word[i + 1:]                          # a dropped letter
    if kind == 1:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]  # two letters swapped
    return word[:i] + word[i] + word[i:]                        # a doubled letter


def roughen(template: str, rng: random.Random, p: float = 0.35) -> str:
    """With probability ``p`` make a template read like quick typing: lower case, no closing
    punctuation, a typo in one template word, a please. Placeholders ({a}, {w}...) are never touched."""
    if rng.random() >= p:
        return template
    t = template
    if rng.random() < 0.5 and t[:1].isupper():
        t = t[0].lower() + t[1:]
    if rng.random() < 0.5:
        t = t.rstrip(".?!")
    if rng.random() < 0.4:
        words = list(_TYPO_WORD.finditer(t))
        if words:
            m = rng.choice(words)
            t = t[:m.start()] + _typo(m.group(1), rng) + t[m.end():]
    if rng.random() < 0.15 and t.isascii():
        t = t + rng.choice((" please", " pls", " thanks", "?"))
    if rng.random() < 0.1:
        t = rng.choice(("Hi! ", "hey, ", "Quick question: ", "Hello. ")) + t
    return t


def ask(templates: tuple[str, ...], rng: random.Random, **slots) -> str:
    """One request: a template drawn at random, roughened, with its slots filled."""
    return roughen(rng.choice(templates), rng).format(**slots)
