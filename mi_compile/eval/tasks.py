"""Synthetic long-context tasks, generated locally (no downloads), deterministic per seed.

Four retrieval tasks in the spirit of RULER (written from the task descriptions, not from its
code), plus a natural-looking text document for next-token comparisons:

``passkey``
    a 5-digit pass key hidden in a repetitive noise haystack; answer: the key.
``multikey``
    multi-key needle-in-a-haystack: several needles "the magic number for <key> is <value>"
    with different keys in the noise haystack; the question names one key.
``kv``
    key-value retrieval: the whole context is a JSON object of random UUID pairs; the
    question names one key, the answer is its UUID value.
``vartrack``
    variable tracking: a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... (plus one distractor
    chain with another value) spread through the noise haystack; the question asks which
    variables equal the first chain's value; the score is the fraction of them named.

Every example is a :class:`Example`: the prompt text (built with the tokenizer's chat template,
ending with an answer prefix in the assistant turn, so the greedy continuation starts with the
answer), its length in tokens (fitted to a target length), the needle depth (the target
needle's relative position in the context, spread evenly over ``[0.05, 0.95]`` across the
examples of a task), and the expected answer(s). :func:`score` grades a greedy continuation by
string match.

Two layers, so the text logic is testable without a tokenizer:

* :func:`draft` -- pure text: a :class:`Draft` (instruction, haystack units with the needles
  inserted, question, answer prefix, answers) for a given number of haystack units and a depth.
* :func:`make_example` / :func:`make_examples` -- chat template + length fitting with a real
  tokenizer (anything with ``__call__`` returning ``input_ids`` and ``apply_chat_template``).
"""
from __future__ import annotations

import dataclasses
import random
import re
import string
import uuid
from typing import Callable, Optional, Sequence

__all__ = ["TASKS", "Draft", "Example", "draft", "make_example", "make_examples", "score",
           "example_depths", "natural_text", "natural_document", "count_tokens"]

TASKS = ("passkey", "multikey", "kv", "vartrack")

# One unit of the noise haystack (repeated). Its token count is the same wherever it sits.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# Words for multi-key needle keys ("<adjective>-<noun>").
_ADJ = ("amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly",
        "keen", "lofty", "mellow", "narrow", "olive", "proud", "quiet", "rustic", "silver", "tidy",
        "upbeat", "vivid", "woolly", "young", "zesty", "bold", "crimson", "distant", "elder", "frosty")
_NOUN = ("anchor", "badger", "canyon", "dolphin", "ember", "falcon", "glacier", "harbor", "island",
         "juniper", "kettle", "lantern", "meadow", "nectar", "orchard", "pebble", "quarry", "river",
         "saddle", "thistle", "umbrella", "valley", "walnut", "yarrow", "zephyr", "beacon", "cobalt",
         "drum", "engine", "forest")


@dataclasses.dataclass
class Draft:
    """The text of one example before the chat template (see module doc)."""
    task: str
    instruction: str          # before the context
    units: list[str]          # context pieces (haystack units and needles), in order
    joiner: str               # how the units are joined into the context
    context_prefix: str       # before the joined units (e.g. "{" for JSON)
    context_suffix: str
    question: str             # after the context
    answer_prefix: str        # appended after the generation prompt (start of the answer)
    answers: list[str]        # expected strings (all of them, for vartrack)
    needle: str               # the target needle's text (a member of ``units``)
    needle_unit: int          # its index in ``units``
    max_new_tokens: int

    @property
    def context(self) -> str:
        return self.context_prefix + self.joiner.join(self.units) + self.context_suffix

    @property
    def user_text(self) -> str:
        return f"{self.instruction}\n\n{self.context}\n\n{self.question}"


@dataclasses.dataclass
class Example:
    task: str
    index: int                # example number within (task, length)
    seed: int
    target_tokens: int
    n_tokens: int             # actual prompt length (tokens)
    depth: float              # requested needle depth (fraction of the context)
    needle_token_depth: float  # measured: tokens before the needle / context tokens
    prompt: str
    answers: list[str]
    max_new_tokens: int
    needle: str

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("prompt")
        return d


def example_depths(n: int, lo: float = 0.05, hi: float = 0.95) -> list[float]:
    """Needle depths for ``n`` examples, spread evenly over ``[lo, hi]`` (0.5 for one)."""
    if n <= 1:
        return [0.5] * n
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def _rng(task: str, seed: int, index: int) -> random.Random:
    # str seeds are hashed with SHA-512 by random.seed (version 2): stable across processes.
    return random.Random(f"mi-compile-eval/{task}/{seed}/{index}")


def _digits(rng: random.Random, n: int) -> str:
    return str(rng.randint(10 ** (n - 1), 10 ** n - 1))


def _at_depth(n_units: int, depth: float) -> int:
    """Insertion index for a needle at ``depth`` of ``n_units`` haystack units."""
    return max(0, min(n_units, round(depth * n_units)))


def _insert(hay: list[str], items: list[tuple[int, str]]) -> tuple[list[str], list[int]]:
    """Insert ``(position, text)`` items into ``hay`` (positions in haystack coordinates;
    equal positions keep their order). Returns the new list and each item's final index."""
    order = sorted(range(len(items)), key=lambda i: (items[i][0], i))
    out, where = [], [0] * len(items)
    j = 0
    for pos in range(len(hay) + 1):
        while j < len(order) and items[order[j]][0] == pos:
            where[order[j]] = len(out)
            out.append(items[order[j]][1])
            j += 1
        if pos < len(hay):
            out.append(hay[pos])
    return out, where


# ----------------------------------------------------------------------------- the four tasks

def _passkey(rng: random.Random, n_units: int, depth: float) -> Draft:
    key = _digits(rng, 5)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    units, (at,) = _insert([NOISE] * n_units, [(_at_depth(n_units, depth), needle)])
    return Draft("passkey",
                 "A pass key is hidden somewhere inside the following long, repetitive text. "
                 "Read all of it, find the pass key and remember it.",
                 units, " ", "", "", "What is the pass key?", "The pass key is",
                 [key], needle, at, max_new_tokens=8)


def _multikey(rng: random.Random, n_units: int, depth: float, n_needles: int = 4) -> Draft:
    keys = []
    while len(keys) < n_needles:
        k = f"{rng.choice(_ADJ)}-{rng.choice(_NOUN)}"
        if k not in keys:
            keys.append(k)
    values = []
    while len(values) < n_needles:
        v = _digits(rng, 7)
        if v not in values:
            values.append(v)
    sentences = [f"One of the magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
    target = 0
    items = [(_at_depth(n_units, depth), sentences[0])]
    items += [(rng.randint(0, n_units), s) for s in sentences[1:]]   # distractors anywhere
    units, where = _insert([NOISE] * n_units, items)
    return Draft("multikey",
                 "Some magic numbers are hidden inside the following long, repetitive text. "
                 "Each belongs to a different key. Read all of it and remember them.",
                 units, " ", "", "",
                 f"What is the magic number for {keys[target]} mentioned in the text above?",
                 f"The magic number for {keys[target]} is",
                 [values[target]], sentences[target], where[0], max_new_tokens=12)


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _kv(rng: random.Random, n_units: int, depth: float) -> Draft:
    n = max(1, n_units)
    pairs = [(_uuid(rng), _uuid(rng)) for _ in range(n)]
    at = min(n - 1, _at_depth(n, depth))
    units = [f'"{k}": "{v}"' for k, v in pairs]
    key, value = pairs[at]
    return Draft("kv",
                 "Below is a JSON object of key-value pairs, where every key and every value is "
                 "a random UUID. Keys are unique.",
                 units, ",\n ", "JSON data:\n{", "}",
                 f'Find the key "{key}" in the JSON object above. What is its value?',
                 f'The value associated with the key "{key}" is "',
                 [value], units[at], at, max_new_tokens=40)


def _var_names(rng: random.Random, n: int, avoid: set) -> list[str]:
    out = []
    while len(out) < n:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in avoid and name not in out:
            out.append(name)
    return out


def _vartrack(rng: random.Random, n_units: int, depth: float, hops: int = 4) -> Draft:
    value, other = _digits(rng, 5), _digits(rng, 5)
    while other == value:
        other = _digits(rng, 5)
    names = _var_names(rng, 2 * (hops + 1), set())
    chain, distract = names[:hops + 1], names[hops + 1:]

    def statements(vars_, val):
        return [f"VAR {vars_[0]} = {val}."] + [f"VAR {b} = VAR {a}." for a, b in zip(vars_, vars_[1:])]

    # The chain starts at ``depth`` and its later links are spread over the rest of the context
    # (in order, so every link follows the one it refers to); the distractor chain anywhere.
    start = _at_depth(n_units, depth)
    pos = [start] + sorted(rng.randint(start, n_units) for _ in range(hops))
    dstart = rng.randint(0, n_units)
    dpos = [dstart] + sorted(rng.randint(dstart, n_units) for _ in range(hops))
    items = list(zip(pos, statements(chain, value))) + list(zip(dpos, statements(distract, other)))
    units, where = _insert([NOISE] * n_units, items)
    return Draft("vartrack",
                 "Memorize and track the chain(s) of variable assignments hidden in the following "
                 "long, repetitive text.",
                 units, " ", "", "",
                 f"Which variables are assigned the value {value}, directly or through other "
                 "variables, in the text above? List all of them.",
                 f"The variables assigned the value {value} are:",
                 chain, items[0][1], where[0], max_new_tokens=32)


_DRAFTS: dict[str, Callable[[random.Random, int, float], Draft]] = {
    "passkey": _passkey, "multikey": _multikey, "kv": _kv, "vartrack": _vartrack}


def draft(task: str, n_units: int, depth: float, seed: int = 0, index: int = 0) -> Draft:
    """The text of example ``index`` of ``task`` (deterministic in ``(task, seed, index)``,
    ``n_units`` and ``depth``) with ``n_units`` haystack units (kv: key-value pairs)."""
    if task not in _DRAFTS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    return _DRAFTS[task](_rng(task, seed, index), int(n_units), float(depth))


# ----------------------------------------------------------------------------- scoring

def _found(answer: str, text: str) -> bool:
    # Whole-token match: "12345" must not match inside "123456", nor "ABCDE" inside "XABCDE".
    return re.search(r"(?<![0-9A-Za-z])" + re.escape(answer) + r"(?![0-9A-Za-z])", text) is not None


def score(example_or_answers, continuation: str) -> float:
    """Fraction of the expected answers found in ``continuation`` (whole-token string match).

    Single-answer tasks score 0 or 1; vartrack scores the fraction of the chain's variables
    named. Accepts an :class:`Example`, a :class:`Draft` or a list of answer strings."""
    answers = getattr(example_or_answers, "answers", example_or_answers)
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        raise ValueError("no expected answers")
    return sum(_found(a, continuation) for a in answers) / len(answers)


# ----------------------------------------------------------------------------- tokenizer side

def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer, d: Draft) -> str:
    messages = [{"role": "user", "content": d.user_text}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt + d.answer_prefix


def make_example(tokenizer, task: str, target_tokens: int, depth: float, seed: int = 0,
                 index: int = 0, tolerance: float = 0.005) -> Example:
    """Example ``index`` of ``task``: the prompt (chat template + answer prefix) fitted to
    ``target_tokens`` (within ``tolerance``, or the closest a whole unit allows), the target
    needle at ``depth`` of the context."""
    unit_tokens = None

    def build(n):
        d = draft(task, n, depth, seed, index)
        return d, _render(tokenizer, d)

    d0, p0 = build(0 if task != "kv" else 1)
    base = count_tokens(tokenizer, p0)
    # Tokens per unit, measured on a short stretch (stable: units are separated by the joiner).
    d1, p1 = build(20)
    unit_tokens = max(1e-3, (count_tokens(tokenizer, p1) - base) / (20 - (task == "kv")))
    n = max(1, round((target_tokens - base) / unit_tokens))
    best = None
    for _ in range(6):
        d, prompt = build(n)
        got = count_tokens(tokenizer, prompt)
        if best is None or abs(got - target_tokens) < abs(best[2] - target_tokens):
            best = (d, prompt, got, n)
        if abs(got - target_tokens) <= tolerance * target_tokens:
            break
        step = round((target_tokens - got) / unit_tokens)
        if step == 0:
            break
        n = max(1, n + step)
    d, prompt, got, n = best
    # Measured depth: tokens of the context before the needle / tokens of the whole context.
    ctx_start = prompt.index(d.context)
    needle_start = ctx_start + len(d.context_prefix) + sum(len(u) + len(d.joiner) for u in d.units[:d.needle_unit])
    assert prompt[needle_start:needle_start + len(d.needle)] == d.needle
    before = count_tokens(tokenizer, prompt[ctx_start:needle_start])
    total = count_tokens(tokenizer, d.context)
    return Example(task=task, index=index, seed=seed, target_tokens=int(target_tokens), n_tokens=got,
                   depth=float(depth), needle_token_depth=before / max(1, total), prompt=prompt,
                   answers=list(d.answers), max_new_tokens=d.max_new_tokens, needle=d.needle)


def make_examples(tokenizer, task: str, target_tokens: int, n: int, seed: int = 0) -> list[Example]:
    """``n`` examples of ``task`` at ``target_tokens``, needle depths spread by :func:`example_depths`."""
    return [make_example(tokenizer, task, target_tokens, depth, seed=seed, index=i)
            for i, depth in enumerate(example_depths(n))]


# ----------------------------------------------------------------------------- natural text

_PEOPLE = ("the engineer", "my grandmother", "a young teacher", "the old fisherman", "our neighbour",
           "the mayor", "a tired nurse", "the baker on the corner", "a curious student", "the pilot",
           "the gardener", "an elderly poet", "the librarian", "a quiet child", "the shopkeeper")
_PLACES = ("the harbour", "the northern valley", "a small village", "the city library", "the train station",
           "the mountain pass", "the riverbank", "an empty warehouse", "the market square", "the old mill",
           "the university", "a crowded cafe", "the lighthouse", "the forest edge", "the museum")
_THINGS = ("a wooden box", "the letters", "an old map", "the recipe", "a broken clock", "the painting",
           "a blue bicycle", "the notebook", "a bag of apples", "the radio", "a silver key",
           "the garden tools", "a pile of books", "the photographs", "a warm coat")
_VERBS = ("found", "repaired", "sold", "carried", "forgot", "painted", "borrowed", "described",
          "hid", "returned", "opened", "studied", "lost", "cleaned", "measured")
_TIMES = ("Early in the morning", "Last winter", "After the storm", "On Sunday", "Years ago",
          "Before dinner", "During the festival", "That evening", "In the spring", "At midnight")
_ADVERBS = ("slowly", "carefully", "happily", "without a word", "in a hurry", "with great care",
            "for the first time", "once again", "by accident", "at last")
_REASONS = ("because it was raining", "since nobody else would", "although it was late",
            "so that the children could see it", "as the town had asked", "while the others slept",
            "before the shops closed", "after a long discussion", "to keep a promise", "for no clear reason")
_REMARKS = ("Nobody expected what happened next.", "It was a strange day.",
            "The weather changed quickly.", "Everyone agreed it had been worth the effort.",
            "Some people still talk about it.", "The news spread through the town.",
            "It took longer than anyone had planned.", "There was laughter in the streets.",
            "Prices at the market had risen again.", "The river was higher than usual.")


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _sentence(rng: random.Random) -> str:
    form = rng.randrange(6)
    p, q = rng.sample(_PEOPLE, 2)
    place, thing, verb = rng.choice(_PLACES), rng.choice(_THINGS), rng.choice(_VERBS)
    if form == 0:
        return f"{rng.choice(_TIMES)}, {p} {verb} {thing} near {place}."
    if form == 1:
        return f"{_cap(p)} {rng.choice(_ADVERBS)} {verb} {thing} {rng.choice(_REASONS)}."
    if form == 2:
        n = rng.randint(2, 97)
        return f"At {place}, {q} counted {n} visitors, {rng.choice(('more', 'fewer'))} than the year before."
    if form == 3:
        return f"\"Have you seen {thing}?\" asked {p}. {_cap(q)} shook their head and pointed towards {place}."
    if form == 4:
        return rng.choice(_REMARKS)
    return f"{_cap(p)} told {q} that {thing} had been kept at {place} since {rng.randint(1850, 2020)}."


def natural_text(n_sentences: int, seed: int = 0) -> str:
    """A long, deterministic story-like text of varied template sentences, in paragraphs."""
    rng = random.Random(f"mi-compile-eval/natural/{seed}")
    paras, cur = [], []
    for _ in range(n_sentences):
        cur.append(_sentence(rng))
        if len(cur) >= rng.randint(3, 7):
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


def natural_document(tokenizer, target_tokens: int, seed: int = 0) -> list[int]:
    """Token ids of :func:`natural_text`, exactly ``target_tokens`` long (plain text, no template)."""
    n = max(8, target_tokens // 12)
    while True:
        ids = tokenizer(natural_text(n, seed), add_special_tokens=False)["input_ids"]
        if len(ids) >= target_tokens:
            return list(ids[:target_tokens])
        n = int(n * 1.3) + 8
