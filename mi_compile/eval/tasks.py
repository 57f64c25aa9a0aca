"""Synthetic long-context tasks, generated locally (no downloads), deterministic per seed.

Four retrieval tasks in the spirit of RULER (written from the task descriptions, not from its
code), in two haystacks, plus documents for next-token comparisons.

``passkey``
    a pass key hidden in the haystack; answer: the key.
``multikey``
    multi-key needle-in-a-haystack: several needles with different (in the Python haystack:
    deliberately similar) keys; the question names one key.
``kv``
    key-value retrieval: many pairs of random strings; the question names one key, the answer
    is its value.
``vartrack``
    variable tracking: a chain of assignments from a number through several variables (plus a
    distractor chain with another value); the question names a variable of the chain.

Haystacks (``haystack=``):

``"noise"`` (the first version, kept so that the SmolLM2 numbers stay reproducible)
    a repeated noise sentence; needles as English sentences (kv: the whole context is a JSON
    object of UUID pairs; vartrack asks for every variable of the chain, scored as the
    fraction named). Built as text, fitted to the length by re-tokenizing.
``"python"`` (for code models such as Qwen2.5-Coder)
    real Python source -- the modules of the running interpreter's standard library, read at
    run time (nothing is copied into this project), cut at statement boundaries; when they are
    missing or run short, generated code (:func:`synthetic_module`). Needles are Python
    assignments inserted at statement boundaries with the indentation found there::

        PASS_KEY = 48213  # the pass key: remember it           (passkey)
        MAGIC_NUMBER_AMBER_FALCON = 3417265                      (multikey; distractors share words)
        KV_REGISTRY["9f3a2c1e"] = "b71d0e44"                     (kv: 32 entries, one asked)
        qzvkt = 48213 ... mbxro = qzvkt                          (vartrack: ask mbxro; one hop)

    Every answer is one string (a number or a hex string). Prompts are assembled directly as
    token ids from pieces tokenized once per tokenizer (:class:`CodePool`), so a 128K-token
    prompt costs no tokenizer call on the whole text, and their length is the requested one
    to within a line of code.

Every example is an :class:`Example`: the prompt (built with the tokenizer's chat template,
ending with an answer prefix in the assistant turn, so the answer is what comes next), its
length in tokens, the needle depth (the target needle's relative position in the context,
spread evenly over ``[0.05, 0.95]`` across the examples of a task), the expected answer(s),
and ``target``, the exact continuation that teacher-forced scoring checks token by token
(:func:`prompt_and_answer_ids` gives both as token ids, the answer as the tokenizer writes it
after that prompt). :func:`score` grades a free continuation by string match instead.

Two layers, so the text logic is testable without a tokenizer:

* :func:`draft` / :func:`code_draft` -- pure text: the instruction, the needles, question,
  answer prefix and answers for a given depth.
* :func:`make_example` / :func:`make_examples` -- chat template + length fitting with a real
  tokenizer (anything with ``__call__`` returning ``input_ids`` and ``apply_chat_template``).

Documents for the top-1 / KL comparison: :func:`natural_document` (story-like sentences, the
first version) and :func:`code_document` (a stretch of the Python haystack, no needles).
"""
from __future__ import annotations

import ast
import dataclasses
import glob
import hashlib
import keyword
import os
import random
import re
import string
import sys
import sysconfig
import uuid
from typing import Callable, Iterator, Optional, Sequence

__all__ = ["TASKS", "HAYSTACKS", "Draft", "Example", "draft", "make_example", "make_examples", "score",
           "example_depths", "make_example_at", "natural_text", "natural_document", "count_tokens", "prompt_and_answer_ids",
           "split_answer", "CodeDraft", "code_draft", "CodePool", "code_pool", "split_source",
           "synthetic_module", "code_document"]

TASKS = ("passkey", "multikey", "kv", "vartrack")
HAYSTACKS = ("noise", "python")

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
    target: str = ""          # the continuation teacher-forced scoring checks (answer text after the prompt)
    haystack: str = "noise"
    input_ids: Optional[list[int]] = None   # python haystack: the prompt as assembled token ids
    answer_ids: Optional[list[int]] = None  # python haystack: ``target`` as tokens after ``input_ids``

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("prompt")
        d.pop("input_ids")
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
                   answers=list(d.answers), max_new_tokens=d.max_new_tokens, needle=d.needle,
                   target=_noise_target(d))


def _noise_target(d: Draft) -> str:
    """The continuation a correct answer starts with, after ``d.answer_prefix``."""
    text = ", ".join(d.answers)
    return text if d.answer_prefix.endswith((" ", '"')) else " " + text


def make_examples(tokenizer, task: str, target_tokens: int, n: int, seed: int = 0,
                  haystack: str = "noise") -> list[Example]:
    """``n`` examples of ``task`` at ``target_tokens``, needle depths spread by :func:`example_depths`,
    in the ``haystack`` (``"noise"`` or ``"python"``, see the module doc)."""
    if haystack not in HAYSTACKS:
        raise ValueError(f"unknown haystack {haystack!r}; choose from {', '.join(HAYSTACKS)}")
    build = make_example if haystack == "noise" else make_code_example
    return [build(tokenizer, task, target_tokens, depth, seed=seed, index=i)
            for i, depth in enumerate(example_depths(n))]


def make_example_at(tokenizer, task: str, target_tokens: int, n: int, index: int, seed: int = 0,
                    haystack: str = "noise") -> Example:
    """Example ``index`` of ``make_examples(tokenizer, task, target_tokens, n, seed, haystack)``,
    built alone (the harness builds each example when it runs it)."""
    if not 0 <= index < n:
        raise ValueError(f"example index {index} out of range for {n} examples")
    if haystack not in HAYSTACKS:
        raise ValueError(f"unknown haystack {haystack!r}; choose from {', '.join(HAYSTACKS)}")
    build = make_example if haystack == "noise" else make_code_example
    return build(tokenizer, task, target_tokens, example_depths(n)[index], seed=seed, index=index)


# ----------------------------------------------------------------------------- teacher forcing

def split_answer(tokenizer, prefix_text: str, target: str) -> tuple[int, list[int]]:
    """How ``target`` is tokenized right after ``prefix_text``: ``(drop, answer_ids)``.

    BPE may merge the first characters of the answer with the end of the prefix (``' "'`` +
    ``'b'`` -> ``' "b'`` in some vocabularies), so the answer's tokens are not always the
    tokens of the answer alone. The prefix is tokenized alone and with the target appended;
    the tokens after their common prefix are the answer, and ``drop`` is how many of the
    prefix's own last tokens the joint tokenization replaced (to be cut from the prompt)."""
    alone = _ids(tokenizer, prefix_text)
    joint = _ids(tokenizer, prefix_text + target)
    p = 0
    while p < min(len(alone), len(joint)) and alone[p] == joint[p]:
        p += 1
    if p == len(joint):
        raise ValueError(f"target {target!r} adds no token after {prefix_text[-40:]!r}")
    return len(alone) - p, list(joint[p:])


def prompt_and_answer_ids(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """``(prompt_ids, answer_ids)`` for teacher-forced scoring: the prompt as the model reads it
    and ``example.target`` as the tokens that must follow it (each the argmax at its position).
    Python-haystack examples carry both; for the noise haystack the prompt is tokenized here and
    the split between prompt and answer is taken from the question part (:func:`split_answer`)."""
    if example.input_ids is not None and example.answer_ids is not None:
        return list(example.input_ids), list(example.answer_ids)
    if not example.target:
        raise ValueError(f"{example.task} example #{example.index} has no target to score")
    ids = _ids(tokenizer, example.prompt)
    tail = example.prompt[example.prompt.rfind("\n") + 1:]   # the answer prefix's line: tokenized alike alone
    drop, answer = split_answer(tokenizer, tail, example.target)
    return (ids[:len(ids) - drop] if drop else ids), answer


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


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


# ----------------------------------------------------------------------------- Python-source haystack

#: Pieces of a function or class longer than this many lines are cut at the statements of its
#: body (recursively), so that needles can sit near any depth and the length fit is fine-grained.
MAX_PIECE_LINES = 40
#: Windows of the pool start among the module-level pieces of its first ``POOL_SPAN`` tokens, so
#: an example does not depend on how far the pool has grown (on which lengths were built before).
POOL_SPAN = 1 << 18
#: Modules of the standard library left out of the haystack (``this`` is ROT13 text).
_SKIP_MODULES = ("this.py", "antigravity.py")
_SENTINEL = "<<<mi-compile: context goes here>>>"


@dataclasses.dataclass(frozen=True)
class Piece:
    """Consecutive lines of source. ``indent``: a needle may go right before this piece, with
    this indentation (the piece starts a statement there); ``None``: not before this piece."""
    text: str
    indent: Optional[str]


def split_source(text: str, name: str = "", max_lines: int = MAX_PIECE_LINES) -> list[Piece]:
    """One module's source cut into :class:`Piece` s at statement starts.

    Module-level statements (with their decorators and the comments after them) are pieces;
    a class or function longer than ``max_lines`` is cut at its body's statements, and so on
    inward; a statement that is still longer (a long literal) is cut every ``max_lines`` lines,
    and no needle goes inside it. Every piece ends with a newline and starts with a line of code,
    so that tokenizing the pieces one by one matches tokenizing their concatenation in
    tokenizers whose pre-tokenizer splits before such a line (Qwen2's, Llama 3's).
    ``name`` (optional) heads the first piece as a ``# file: <name>`` comment. Raises
    ``SyntaxError`` for source the running Python cannot parse."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.endswith("\n"):
        text += "\n"
    tree = ast.parse(text)
    lines = [line + "\n" for line in text.split("\n")[:-1]]
    starts = {0: True}

    def visit(body):
        for node in body:
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", ())]) - 1
            starts.setdefault(first, True)
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and node.end_lineno - first > max_lines:
                visit(node.body)

    visit(tree.body)
    bounds = sorted(s for s in starts if s < len(lines)) + [len(lines)]
    pieces = []
    for a, b in zip(bounds, bounds[1:]):
        first = lines[a]
        indent = first[:len(first) - len(first.lstrip(" \t"))] if first.strip() else ""
        step = b - a if b - a <= 2 * max_lines else max_lines     # an uncut statement: in chunks
        for c in range(a, b, step):
            pieces.append(Piece("".join(lines[c:min(b, c + step)]), indent if c == a else None))
    if name and pieces:
        pieces[0] = Piece(f"# file: {name}\n\n" + pieces[0].text, "")
    return pieces


_S_VERBS = ("load", "parse", "build", "merge", "filter", "render", "update", "compute", "resolve",
            "encode", "decode", "split", "scan", "count", "normalize", "collect", "check", "format")
_S_NOUNS = ("record", "config", "token", "buffer", "segment", "header", "entry", "node", "path",
            "item", "batch", "frame", "index", "value", "packet", "column", "event", "span")


def _s_function(rng: random.Random, indent: str = "", method: bool = False) -> str:
    verb, noun, other = rng.choice(_S_VERBS), rng.choice(_S_NOUNS), rng.choice(_S_NOUNS)
    args = (["self"] if method else []) + [f"{noun}s", f"{other}=None", f"limit={rng.randint(2, 500)}"]
    k, m = rng.randint(2, 9), rng.randint(0, 99)
    body = rng.choice((
        [f"result = []",
         f"for i, item in enumerate({noun}s):",
         f"    if i >= limit:",
         f"        break",
         f"    if {other} is not None and item in {other}:",
         f"        continue",
         f"    result.append(item * {k} + {m})",
         f"return result"],
        [f"counts = {{}}",
         f"for item in {noun}s[:limit]:",
         f"    key = str(item).lower()",
         f"    counts[key] = counts.get(key, 0) + 1",
         f"if {other}:",
         f"    counts.update({other})",
         f"return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))"],
        [f"total = 0.0",
         f"n = 0",
         f"while n < min(limit, len({noun}s)):",
         f"    total += math.sqrt(abs({noun}s[n])) * {k}",
         f"    n += 1",
         f"return total / max(n, 1)"],
        [f"try:",
         f"    first = {noun}s[0]",
         f"except (IndexError, TypeError):",
         f"    return {other}",
         f"if len({noun}s) > limit:",
         f"    raise ValueError(f\"too many {noun}s: {{len({noun}s)}} > {{limit}}\")",
         f"return [first] + [x for x in {noun}s[1:] if x != first]"],
        [f"parts = []",
         f"for item in {noun}s:",
         f"    text = os.fspath(item) if hasattr(item, '__fspath__') else str(item)",
         f"    parts.append(text.strip().replace('{rng.choice(string.ascii_lowercase)}', '_'))",
         f"joined = '{rng.choice(', ;:|')}'.join(parts[:limit])",
         f"return joined if {other} is None else {other} + joined"],
    ))
    doc = f'"""{verb.capitalize()} the {noun}s (at most ``limit`` of them) and return the result."""'
    head = f"{indent}def {verb}_{noun}s({', '.join(args)}):"
    return "\n".join([head, f"{indent}    {doc}"] + [f"{indent}    {line}" for line in body]) + "\n"


def synthetic_module(index: int) -> str:
    """A generated Python module (deterministic in ``index``): functions and classes of
    ordinary-looking code, the Python haystack's fallback when the standard library's source
    is missing or runs short."""
    rng = random.Random(f"mi-compile-eval/synthetic/{index}")
    noun = rng.choice(_S_NOUNS)
    out = [f'"""Helpers for {noun} handling (generated module {index})."""\n\nimport math\nimport os\n\n'
           f"DEFAULT_LIMIT = {rng.randint(10, 1000)}\n"]
    for _ in range(rng.randint(6, 12)):
        if rng.random() < 0.3:
            name = rng.choice(_S_NOUNS).capitalize() + rng.choice(("Store", "Reader", "Table", "Cache", "Queue"))
            methods = "\n".join(_s_function(rng, "    ", method=True) for _ in range(rng.randint(2, 4)))
            out.append(f"\n\nclass {name}:\n    \"\"\"A {name[:-5].lower() or name.lower()} container.\"\"\"\n\n"
                       f"    def __init__(self, size={rng.randint(1, 64)}):\n        self.size = size\n"
                       f"        self.items = []\n\n{methods}")
        else:
            out.append("\n\n" + _s_function(rng))
    return "".join(out)


def _stdlib_files() -> list[str]:
    root = sysconfig.get_paths().get("stdlib") or os.path.dirname(os.__file__)
    return sorted(f for f in glob.glob(os.path.join(root, "*.py"))
                  if not os.path.basename(f).startswith("_") and os.path.basename(f) not in _SKIP_MODULES)


class CodePool:
    """The Python haystack of one tokenizer: source pieces in a fixed order, each tokenized once.

    ``source``: ``"stdlib"`` (the running interpreter's standard library, public top-level
    modules in name order), ``"synthetic"`` (:func:`synthetic_module` only) or ``"auto"``
    (the standard library, then generated modules if it runs short). The pool grows on demand
    (:meth:`ensure`); what it holds up to a given token count never depends on how far it grew."""

    def __init__(self, tokenizer, source: str = "auto"):
        if source not in ("auto", "stdlib", "synthetic"):
            raise ValueError(f"unknown Python haystack source {source!r}: auto, stdlib or synthetic")
        self.tokenizer, self.source = tokenizer, source
        self.pieces: list[Piece] = []
        self.ids: list[list[int]] = []
        self.offsets: list[int] = []     # tokens before each piece
        self.tokens = 0
        self.files: list[str] = []
        self._sha = hashlib.sha256()
        self._feed = self._sources()
        self._lines: dict[int, list[list[int]]] = {}

    def _sources(self) -> Iterator[tuple[str, str]]:
        if self.source in ("auto", "stdlib"):
            for path in _stdlib_files():
                try:
                    with open(path, encoding="utf-8") as f:
                        yield os.path.basename(path), f.read()
                except (OSError, UnicodeDecodeError):
                    continue
            if self.source == "stdlib":
                return
        i = 0
        while True:
            yield f"generated_{i}.py", synthetic_module(i)
            i += 1

    def ensure(self, n_tokens: int) -> "CodePool":
        """Grow the pool to at least ``n_tokens`` tokens."""
        while self.tokens < n_tokens:
            batch, chars = [], 0
            while chars < 300_000:
                try:
                    name, text = next(self._feed)
                except StopIteration:
                    break
                try:
                    pieces = split_source(text, name)
                except (SyntaxError, ValueError):
                    continue
                self.files.append(name)
                batch += pieces
                chars += len(text)
            if not batch:
                raise RuntimeError(f"the Python haystack ({self.source}) ran out at {self.tokens} tokens; "
                                   f"{n_tokens} needed")
            ids = self.tokenizer([p.text for p in batch], add_special_tokens=False)["input_ids"]
            for piece, piece_ids in zip(batch, ids):
                self.pieces.append(piece)
                self.ids.append(list(piece_ids))
                self.offsets.append(self.tokens)
                self.tokens += len(piece_ids)
                self._sha.update(piece.text.encode())
        return self

    def window_starts(self) -> list[int]:
        """Module-level pieces among the first :data:`POOL_SPAN` tokens: where windows start."""
        self.ensure(POOL_SPAN)
        return [i for i, (p, o) in enumerate(zip(self.pieces, self.offsets)) if o < POOL_SPAN and p.indent == ""]

    def line_ids(self, i: int) -> list[list[int]]:
        """Piece ``i``'s lines, each tokenized (for filling a context up to its exact length)."""
        if i not in self._lines:
            lines = [line + "\n" for line in self.pieces[i].text.split("\n")[:-1]]
            self._lines[i] = [list(x) for x in self.tokenizer(lines, add_special_tokens=False)["input_ids"]]
        return self._lines[i]

    def describe(self) -> dict:
        return dict(source=self.source, python=sys.version.split()[0], files=len(self.files),
                    first_files=self.files[:3], pieces=len(self.pieces), tokens=self.tokens,
                    sha256=self._sha.hexdigest()[:16])


_POOLS: dict[tuple[int, str], CodePool] = {}


def code_pool(tokenizer, source: str = "auto") -> CodePool:
    """The (cached) :class:`CodePool` of ``tokenizer``."""
    key = (id(tokenizer), source)
    pool = _POOLS.get(key)
    if pool is None or pool.tokenizer is not tokenizer:
        pool = _POOLS[key] = CodePool(tokenizer, source)
    return pool


@dataclasses.dataclass
class Needle:
    text: str            # one statement and a newline (and a blank line), without indentation
    depth: float         # where it goes, as a fraction of the context
    target: bool = False
    optional: bool = False   # a distractor that a prompt too short for all of them leaves out


@dataclasses.dataclass
class CodeDraft:
    """One Python-haystack example before the haystack is chosen: needles and the question."""
    task: str
    instruction: str
    needles: list[Needle]   # chains in their order (a link never precedes what it refers to)
    question: str
    answer_prefix: str      # the start of the assistant's answer; the answer follows it directly
    answers: list[str]
    max_new_tokens: int

    @property
    def target(self) -> str:
        return self.answers[0]

    @property
    def needle(self) -> str:
        return next(n.text for n in self.needles if n.target)


_CODE_INTRO = "Below is a long Python source file. "


def _hex(rng: random.Random, taken: set) -> str:
    while True:
        h = f"{rng.getrandbits(32):08x}"
        if h not in taken:
            taken.add(h)
            return h


def _py_names(rng: random.Random, n: int) -> list[str]:
    import builtins

    out = []
    while len(out) < n:
        name = "".join(rng.choice(string.ascii_lowercase) for _ in range(5))
        if name not in out and not keyword.iskeyword(name) and not hasattr(builtins, name):
            out.append(name)
    return out


def _code_passkey(rng: random.Random, depth: float) -> CodeDraft:
    key = _digits(rng, 5)
    return CodeDraft("passkey",
                     _CODE_INTRO + "Somewhere in it a pass key is assigned to PASS_KEY. Read all of the code "
                     "and remember the pass key.",
                     [Needle(f"PASS_KEY = {key}  # the pass key: remember it\n\n", depth, True)],
                     "What is the value of PASS_KEY in the code above?", "The value of PASS_KEY is ",
                     [key], max_new_tokens=8)


def _code_multikey(rng: random.Random, depth: float, n_needles: int = 6) -> CodeDraft:
    adj, noun = rng.sample(_ADJ, n_needles - 1), rng.sample(_NOUN, n_needles - 1)
    # the target, two distractors sharing one of its words, the rest unrelated
    pairs = [(adj[0], noun[0]), (adj[0], noun[1]), (adj[1], noun[0])] + list(zip(adj[2:], noun[2:]))
    names = [f"MAGIC_NUMBER_{a.upper()}_{b.upper()}" for a, b in pairs[:n_needles]]
    values = []
    while len(values) < len(names):
        v = _digits(rng, 7)
        if v not in values:
            values.append(v)
    needles = [Needle(f"{names[0]} = {values[0]}\n\n", depth, True)]
    needles += [Needle(f"{k} = {v}\n\n", rng.random(), optional=True) for k, v in zip(names[1:], values[1:])]
    return CodeDraft("multikey",
                     _CODE_INTRO + "Several magic numbers are assigned in it to constants named "
                     "MAGIC_NUMBER_<ADJECTIVE>_<NOUN>. Read all of the code and remember them.",
                     needles, f"What is the value of {names[0]} in the code above?",
                     f"The value of {names[0]} is ", [values[0]], max_new_tokens=12)


def _code_kv(rng: random.Random, depth: float, n_pairs: int = 32) -> CodeDraft:
    taken: set = set()
    pairs = [(_hex(rng, taken), _hex(rng, taken)) for _ in range(n_pairs)]
    key, value = pairs[0]
    needles = [Needle(f'KV_REGISTRY["{key}"] = "{value}"\n', depth, True)]
    needles += [Needle(f'KV_REGISTRY["{k}"] = "{v}"\n', rng.random(), optional=True) for k, v in pairs[1:]]
    return CodeDraft("kv",
                     _CODE_INTRO + 'Entries of a registry are assigned throughout it as KV_REGISTRY["<key>"] = '
                     '"<value>", where keys and values are random hexadecimal strings. Read all of the code '
                     "and remember the entries.",
                     needles, f'What is the value of KV_REGISTRY["{key}"] in the code above?',
                     f'The value of KV_REGISTRY["{key}"] is "', [value], max_new_tokens=16)


def _code_vartrack(rng: random.Random, depth: float, hops: int = 1) -> CodeDraft:
    """One hop by default: with two, the model fails even with dense attention at 128K
    (0.25 on the H200, docs/results.md), so the task would not separate configs."""
    value, other = _digits(rng, 5), _digits(rng, 5)
    while other == value:
        other = _digits(rng, 5)
    names = _py_names(rng, 2 * (hops + 1))
    chain, distract = names[:hops + 1], names[hops + 1:]

    def links(vars_, val, start):
        depths = [start] + sorted(rng.uniform(start, 1.0) for _ in range(hops))
        texts = [f"{vars_[0]} = {val}\n"] + [f"{b} = {a}\n" for a, b in zip(vars_, vars_[1:])]
        return [Needle(t, d) for t, d in zip(texts, depths)]

    needles = links(chain, value, depth)
    needles[0].target = True
    needles += links(distract, other, rng.random())
    return CodeDraft("vartrack",
                     _CODE_INTRO + "Some variables in it are assigned a number, and others are assigned from "
                     "those variables. Read all of the code and keep track of the assignments.",
                     needles, f"Following the assignments in the code above, which number does the variable "
                     f"{chain[-1]} hold?", f"The variable {chain[-1]} holds the number ", [value],
                     max_new_tokens=8)


_CODE_DRAFTS: dict[str, Callable[[random.Random, float], CodeDraft]] = {
    "passkey": _code_passkey, "multikey": _code_multikey, "kv": _code_kv, "vartrack": _code_vartrack}


def code_draft(task: str, depth: float, seed: int = 0, index: int = 0) -> CodeDraft:
    """The needles and question of Python-haystack example ``index`` of ``task`` (deterministic
    in ``(task, seed, index)`` and ``depth``)."""
    if task not in _CODE_DRAFTS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    return _CODE_DRAFTS[task](random.Random(f"mi-compile-eval/python/{task}/{seed}/{index}"), float(depth))


def _chat(tokenizer, content: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    return f"User: {content}\n\nAssistant: "


def make_code_example(tokenizer, task: str, target_tokens: int, depth: float, seed: int = 0,
                      index: int = 0, source: str = "auto") -> Example:
    """Python-haystack example ``index`` of ``task``: ``target_tokens`` tokens (to within one
    line of code), the target needle at ``depth`` of the context. The prompt is assembled as
    token ids (``Example.input_ids``); ``Example.prompt`` is left empty (decode the ids to read it)."""
    d = code_draft(task, depth, seed, index)
    content = f"{d.instruction}\n\n```python\n{_SENTINEL}```\n\n{d.question}"
    head, tail = (_chat(tokenizer, content) + d.answer_prefix).split(_SENTINEL)
    head_ids = _ids(tokenizer, head)
    drop, answer_ids = split_answer(tokenizer, tail, d.target)
    tail_ids = _ids(tokenizer, tail)
    tail_ids = tail_ids[:len(tail_ids) - drop]
    ctx, needle_at = code_context(tokenizer, d.needles, target_tokens - len(head_ids) - len(tail_ids),
                                  f"{task}/{seed}/{index}", source, what=f"a {task} prompt of {target_tokens} tokens")
    input_ids = head_ids + ctx + tail_ids
    return Example(task=task, index=index, seed=seed, target_tokens=int(target_tokens), n_tokens=len(input_ids),
                   depth=float(depth), needle_token_depth=(needle_at or 0) / max(1, len(ctx)), prompt="",
                   answers=list(d.answers), max_new_tokens=d.max_new_tokens, needle=d.needle, target=d.target,
                   haystack="python", input_ids=input_ids, answer_ids=answer_ids)


def code_context(tokenizer, needles: Sequence[Needle], context_tokens: int, window: str, source: str = "auto",
                 what: str = "the prompt") -> tuple[list[int], Optional[int]]:
    """``(ids, target_at)``: exactly ``context_tokens`` tokens (to within one line) of the Python
    haystack from the window chosen by ``window`` (a seed string), with ``needles`` inserted at
    statement boundaries at their depths (optional ones dropped, the last first, when the context
    is short); ``target_at`` is where the target needle starts (None without one)."""
    needles = list(needles)
    sizes = [len(x) for x in tokenizer([nd.text for nd in needles], add_special_tokens=False)["input_ids"]]
    while context_tokens - sum(sizes) < max(64, context_tokens // 4) \
            and any(nd.optional for nd in needles):   # short prompts: fewer distractors, the last ones first
        k = max(i for i, nd in enumerate(needles) if nd.optional)
        del needles[k], sizes[k]
    order = sorted(range(len(needles)), key=lambda k: needles[k].depth)   # stable: chains keep their order
    needles, sizes = [needles[k] for k in order], [sizes[k] for k in order]
    budget = context_tokens - sum(sizes)
    if budget < 64:
        raise ValueError(f"{what} is too short ({context_tokens - budget} tokens of context without any haystack)")
    pool = code_pool(tokenizer, source).ensure(POOL_SPAN + context_tokens + 8192)
    start = random.Random(f"mi-compile-eval/python-window/{window}").choice(pool.window_starts())
    chosen, used, i = [], 0, start
    while used + len(pool.ids[i]) <= budget:
        chosen.append(i)
        used += len(pool.ids[i])
        i += 1
    # where needles may go: before a chosen piece that starts a statement
    # (the lines that fill the rest come from piece i: before them too, when i starts a statement;
    # a very short prompt has no other place)
    slots = [(pool.offsets[c] - pool.offsets[start], k) for k, c in enumerate(chosen)
             if pool.pieces[c].indent is not None]
    if pool.pieces[i].indent is not None or not slots:
        slots.append((used, len(chosen)))
    end_indent = pool.pieces[i].indent or ""
    before: dict[int, list[Needle]] = {}
    for j, nd in enumerate(needles):
        # haystack tokens before it, so that with the needles before it the context puts it at its depth
        want = nd.depth * (budget + sum(sizes)) - sum(sizes[:j])
        _, k = min(slots, key=lambda s: (abs(s[0] - want), s[0]))
        before.setdefault(k, []).append(nd)
    ctx: list[int] = []
    needle_at = None
    for k, c in enumerate(chosen + [None]):
        for nd in before.get(k, ()):
            ids = _ids(tokenizer, (pool.pieces[c].indent if c is not None else end_indent) + nd.text)
            if nd.target:
                needle_at = len(ctx)
            ctx += ids
        if c is not None:
            ctx += pool.ids[c]
    rem = context_tokens - len(ctx)
    j = i
    while rem > 0:
        for line in pool.line_ids(j):
            if len(line) > rem:
                rem = 0
                break
            ctx += line
            rem -= len(line)
        j += 1
    return ctx, needle_at


def code_document(tokenizer, target_tokens: int, seed: int = 0, source: str = "auto") -> list[int]:
    """Token ids of a stretch of the Python haystack (no needles, no template), exactly
    ``target_tokens`` long, starting at a module-level statement chosen by ``seed``."""
    pool = code_pool(tokenizer, source).ensure(POOL_SPAN + target_tokens + 8192)
    i = random.Random(f"mi-compile-eval/python-document/{seed}").choice(pool.window_starts())
    ids: list[int] = []
    while len(ids) < target_tokens:
        ids += pool.ids[i]
        i += 1
    return ids[:target_tokens]


# ----------------------------------------------------------------------------- multi-turn

_TURN_SENTINEL = "<<<mi-compile: turn code goes here>>>"
_MULTI_TURN_INSTRUCTION = (_CODE_INTRO + "Somewhere in it a pass key is assigned to PASS_KEY, magic numbers to "
                           "constants named MAGIC_NUMBER_<ADJECTIVE>_<NOUN>, entries of a registry as "
                           'KV_REGISTRY["<key>"] = "<value>", and some variables are assigned from others. '
                           "Read all of the code and remember these; questions about it follow.")
_MULTI_TURN_ACK = "I have read the code and will answer questions about it."
_TURN_INTRO = "Here is another file of the same project (it changes nothing in the first one)."


@dataclasses.dataclass
class Turn:
    """One follow-up turn of a :class:`Conversation`: its tokens continue the cache of everything
    before it (the previous turn's last answer token first, when there is one)."""
    task: str
    ids: list[int]
    answer_ids: list[int]       # teacher-forced after ``ids``; all but the last go into the cache
    answers: list[str]
    target: str
    depth: float                # the asked needle's depth in the shared context


@dataclasses.dataclass
class Conversation:
    """A shared long context (SCBench-style multi-turn): one prefill of ``context_ids``, then
    the ``turns`` in order, each a prefill continuing the cache and a teacher-forced answer."""
    index: int
    seed: int
    target_tokens: int
    context_ids: list[int]
    turns: list[Turn]

    @property
    def n_tokens(self) -> int:
        return len(self.context_ids)


def _render_chat(tokenizer, messages: list[dict], generation: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    text = "".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}\n\n" for m in messages)
    return text + ("Assistant: " if generation else "")


def _after(full: str, prefix: str, what: str) -> str:
    if not full.startswith(prefix):
        raise ValueError(f"the chat template does not render {what} as a continuation of what came before")
    return full[len(prefix):]


def make_conversation(tokenizer, target_tokens: int, index: int = 0, seed: int = 0,
                      tasks: Sequence[str] = TASKS, turn_tokens: int = 2048, source: str = "auto") -> Conversation:
    """Conversation ``index``: a Python haystack of ``target_tokens`` tokens (chat template
    included) holding the needles of every task in ``tasks`` at depths spread over the context,
    the assistant's acknowledgement, then one turn per task: ``turn_tokens`` of new code (another
    file, no needle) and the task's question about the first file, with its answer prefix."""
    if not tasks or any(t not in _CODE_DRAFTS for t in tasks):
        raise ValueError(f"tasks must be a non-empty subset of {', '.join(TASKS)}, got {list(tasks)}")
    rng = random.Random(f"mi-compile-eval/multi-turn/{seed}/{index}")
    depths = example_depths(len(tasks), 0.1, 0.9)
    rng.shuffle(depths)
    drafts = [code_draft(t, dep, seed, 1000 + index) for t, dep in zip(tasks, depths)]
    messages = [{"role": "user", "content": f"{_MULTI_TURN_INSTRUCTION}\n\n```python\n{_SENTINEL}```"},
                {"role": "assistant", "content": _MULTI_TURN_ACK}]
    head, rest = _render_chat(tokenizer, messages, False).split(_SENTINEL)
    rendered = head + _SENTINEL + rest
    head_ids, rest_ids = _ids(tokenizer, head), _ids(tokenizer, rest)
    needles = [nd for d in drafts for nd in d.needles]
    ctx, _ = code_context(tokenizer, needles, target_tokens - len(head_ids) - len(rest_ids),
                          f"multi-turn/{seed}/{index}", source, what=f"a conversation of {target_tokens} tokens")
    turns: list[Turn] = []
    carry: list[int] = []
    for k, d in enumerate(drafts):
        question = d.question.replace("in the code above", "in the first file")
        messages.append({"role": "user", "content": f"{_TURN_INTRO}\n\n```python\n{_TURN_SENTINEL}```\n\n{question}"})
        prompt = _render_chat(tokenizer, messages, True) + d.answer_prefix
        before, after = _after(prompt, rendered, f"turn {k + 1}").split(_TURN_SENTINEL)
        drop, answer_ids = split_answer(tokenizer, after, d.target)
        after_ids = _ids(tokenizer, after)
        code = code_document(tokenizer, turn_tokens, seed=(seed * 1000 + index) * 10 + k, source=source) \
            + _ids(tokenizer, "\n")
        turns.append(Turn(d.task, carry + _ids(tokenizer, before) + code + after_ids[:len(after_ids) - drop],
                          answer_ids, list(d.answers), d.target, next(n.depth for n in d.needles if n.target)))
        messages.append({"role": "assistant", "content": d.answer_prefix + d.target})
        rendered = _render_chat(tokenizer, messages, False)
        # the cache holds the answer but its last token: that one, then the end of the assistant's turn
        closing = _after(rendered, prompt + d.target, f"the answer of turn {k + 1}")
        carry = answer_ids[-1:] + _ids(tokenizer, closing)
    return Conversation(index, seed, int(target_tokens), head_ids + ctx + rest_ids, turns)
