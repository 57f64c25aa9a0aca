"""The calibration prompt: natural-ish long text of an exact token length, deterministic per seed.

A haystack of varied sentences (people, places, numbers, small facts, a few fixed filler
lines) with a few "needles" (pass keys, facts to remember) at seeded depths, and a question at
the end that refers back to them -- so the heads that retrieve from far away have something
to retrieve. With a chat template the text is wrapped as one user turn.
"""
from __future__ import annotations

import random

import torch

NAMES = ["Alice", "Bruno", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jun",
         "Keiko", "Luis", "Mira", "Nikos", "Olga", "Pavel", "Quinn", "Rosa", "Sami", "Tariq"]
PLACES = ["Lisbon", "the harbour", "Nairobi", "the old library", "Kyoto", "a mountain village",
          "the train station", "Oslo", "the market square", "Valparaiso", "the university",
          "a small bakery", "Montreal", "the lighthouse", "Hanoi", "the museum"]
THINGS = ["a red umbrella", "three notebooks", "a brass key", "an old map", "a violin",
          "a basket of figs", "a broken clock", "a telescope", "a wooden chair", "a blue kite",
          "a jar of honey", "a letter", "a pair of boots", "a chess set", "a lantern"]
VERBS = ["found", "bought", "lost", "repaired", "painted", "borrowed", "sold", "described",
         "carried", "forgot"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TOPICS = ["rivers carve valleys over thousands of years",
          "bees communicate the direction of flowers by dancing",
          "the speed of light is close to three hundred thousand kilometres per second",
          "copper turns green when it reacts with air and water",
          "most of the oxygen we breathe comes from the ocean",
          "a leap year has three hundred and sixty six days",
          "the heart of a blue whale is as large as a small car",
          "glass is made mostly from sand heated to a high temperature",
          "octopuses have three hearts and blue blood",
          "the first printed newspapers appeared in the seventeenth century"]
FILLER = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again."]


#: Sentence makers ``(rng, a, b) -> str`` (two distinct names); the draws happen in text order.
SENTENCES = (
    lambda r, a, b: f"On {r.choice(DAYS)}, {a} {r.choice(VERBS)} {r.choice(THINGS)} near {r.choice(PLACES)}.",
    lambda r, a, b: f"{a} told {b} that {r.choice(TOPICS)}.",
    lambda r, a, b: f"The ticket to {r.choice(PLACES)} cost {r.randint(2, 99)} euros and {r.randint(1, 99)} cents.",
    lambda r, a, b: f"{a} and {b} walked {r.randint(2, 40)} kilometres to {r.choice(PLACES)}.",
    lambda r, a, b: f"It is well known that {r.choice(TOPICS)}.",
    lambda r, a, b: f"{a} wrote the number {r.randint(100, 9999)} on {r.choice(THINGS)}.",
)


def _sentence(rng: random.Random) -> str:
    """One haystack sentence: a made-up fact (6 in 7) or a few filler lines."""
    kind = rng.randrange(len(SENTENCES) + 1)
    a, b = rng.sample(NAMES, 2)
    if kind < len(SENTENCES):
        return SENTENCES[kind](rng, a, b)
    return " ".join(rng.sample(FILLER, rng.randint(2, 4)))


def calibration_text(rng: random.Random, approx_words: int) -> tuple[str, str]:
    """(haystack, question): about ``approx_words`` words with needles at seeded depths
    (10%-60% of the way in, so that cutting the end to a token budget keeps them)."""
    key = rng.randint(10000, 99999)
    owner = rng.choice(NAMES)
    place = rng.choice(PLACES)
    needles = [f"The pass key is {key}. Remember it. {key} is the pass key.",
               f"Important: {owner} hid the golden ring in {place}.",
               f"The secret word of the day is '{rng.choice(['orchid', 'granite', 'meteor', 'saffron'])}'."]
    sentences, words = [], 0
    while words < approx_words:
        s = _sentence(rng)
        sentences.append(s)
        words += len(s.split())
    for needle in needles:
        sentences.insert(rng.randrange(len(sentences) // 10, max(len(sentences) // 10 + 1, 6 * len(sentences) // 10)),
                         needle)
    question = f"What is the pass key, and where did {owner} hide the golden ring?"
    return " ".join(sentences), question


def calibration_ids(tokenizer, length: int, seed: int = 0) -> torch.Tensor:
    """``[1, length]`` token ids of the calibration prompt (exactly ``length`` tokens).

    The haystack is cut (at a token boundary) so that the chat-template head, the haystack and
    the question with the template's tail add up to ``length`` tokens.
    """
    if length < 16:
        raise ValueError(f"calibration length must be >= 16 tokens, got {length}")
    rng = random.Random(seed)
    hay, question = calibration_text(rng, approx_words=length + 64)   # > 1 token per word
    intro = "There is important information hidden inside a lot of text. Read it carefully.\n"
    marker = "@@HAYSTACK@@"
    body = intro + marker + "\n" + question
    head, tail = body, ""
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                                 add_generation_prompt=True)
            head, tail = text.split(marker, 1)
        except Exception:  # noqa: BLE001 -- a template that cannot render: plain text
            head, tail = body.split(marker, 1)
    else:
        head, tail = body.split(marker, 1)
    head_ids = tokenizer(head, add_special_tokens=not getattr(tokenizer, "chat_template", None)).input_ids
    tail_ids = tokenizer(tail, add_special_tokens=False).input_ids
    hay_ids = tokenizer(" " + hay, add_special_tokens=False).input_ids
    room = length - len(head_ids) - len(tail_ids)
    if room < 0:   # very short: keep the end of the question
        ids = (head_ids + tail_ids)[-length:]
    else:
        while len(hay_ids) < room:   # never for sane lengths: pad by repeating the haystack
            hay_ids = hay_ids + hay_ids
        ids = head_ids + hay_ids[:room] + tail_ids
    assert len(ids) == length
    return torch.tensor([ids], dtype=torch.long)


def random_ids(vocab_size: int, length: int, seed: int = 0) -> torch.Tensor:
    """``[1, length]`` random ids (models without a tokenizer, e.g. tiny random ones)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, max(4, vocab_size), (1, length), generator=g)
