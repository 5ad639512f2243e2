"""The embedded demo corpus: a deterministic generator of instruction/response pairs (no downloads).

Task families (`build_demo_corpus(families=...)`), each a small skill a few-million-parameter model
can learn on 2 CPU cores; the demo uses FAMILIES:

    units        "convert 3 km to m"                                 -> "3 km is 3000 m"
    lookup       "table: zorvia red, mivren blue, kest green. color of kest?" -> "kest is green"
                 (fact lookup over a small table the generator builds inside the prompt)
    compare      "which is larger: 37 or 52" -> "52 is larger than 37" / "count the words: ..." -> "4"
    reverse      "reverse the words: red fox jumps"                  -> "jumps fox red"
    membership   "is fox in: red fox jumps"                           -> "fox is in the list"
  and, not in the demo's set (a 4 x 256 teacher stays below 25 ROUGE-L on them in 600 steps, so they
  only add noise to a comparison of students; docs/quality.md):
    arithmetic   "what is 23 + 58"                                   -> "81"
    sorting      "sort ascending: 7 42 9 15"                         -> "7 9 15 42"
    strings      "reverse the words: ..." / "uppercase: lamp" / "first letters: ..."

Every row is {"prompt", "response", "family"} (format prompt_response, prompt template
DEMO_PROMPT_TEMPLATE). Sequences stay under ~40 tokens with a 512-piece SentencePiece BPE vocabulary.
Evaluation prompts are held out: no evaluation prompt appears in the training rows.

`labelled_fraction` sets up the case where a teacher has something to teach: the teacher trains on all
training rows, students get only the first `labelled_fraction` of them with responses
(`train_labelled`) and the rest as prompts without responses (`train_prompts`), which on-policy
distillation can use (it needs only prompts).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

DEMO_PROMPT_TEMPLATE = "{instruction}\n"
FAMILIES = ("units", "lookup", "compare", "reverse", "membership")

_WORDS = ("red fox jumps over lazy dog sun moon star tree river stone cloud rain wind fire lamp door book "
          "cat bird fish road hill lake snow leaf rock sand ship wolf bear frog apple bread honey salt milk "
          "green blue gold dark cold warm fast slow tall small quiet bright").split()
_COLORS = ("red", "blue", "green", "gold", "black", "white", "grey", "pink")
_SYLLABLES = ("zor", "vi", "mi", "kest", "ta", "lo", "ren", "dua", "pel", "sa", "nor", "bi", "ka", "lum", "ter")
_UNITS = (("km", "m", 1000), ("m", "cm", 100), ("hours", "minutes", 60), ("kg", "g", 1000),
          ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7), ("liters", "ml", 1000))


def _arithmetic(rng: random.Random):
    kind = rng.choice("+-x")
    if kind == "+":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"what is {a} + {b}", str(a + b)
    if kind == "-":
        a = rng.randint(0, 99)
        b = rng.randint(0, a)
        return f"what is {a} - {b}", str(a - b)
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"what is {a} times {b}", str(a * b)


def _sorting(rng: random.Random):
    values = [rng.randint(0, 99) for _ in range(rng.randint(3, 5))]
    descending = rng.random() < 0.3
    order = "descending" if descending else "ascending"
    return (f"sort {order}: {' '.join(map(str, values))}",
            " ".join(map(str, sorted(values, reverse=descending))))


def _strings(rng: random.Random):
    kind = rng.randrange(3)
    if kind == 0:
        words = rng.sample(_WORDS, rng.randint(3, 4))
        return f"reverse the words: {' '.join(words)}", " ".join(reversed(words))
    if kind == 1:
        word = rng.choice(_WORDS)
        return f"uppercase: {word}", word.upper()
    words = rng.sample(_WORDS, rng.randint(3, 5))
    return f"first letters: {' '.join(words)}", " ".join(w[0] for w in words)


def _units(rng: random.Random):
    big, small, factor = rng.choice(_UNITS)
    amount = rng.randint(1, 150)
    return f"convert {amount} {big} to {small}", f"{amount} {big} is {amount * factor} {small}"


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))


def _lookup(rng: random.Random):
    names = []
    while len(names) < 3:
        name = _name(rng)
        if name not in names:
            names.append(name)
    colors = rng.sample(_COLORS, 3)
    table = ", ".join(f"{n} {c}" for n, c in zip(names, colors))
    k = rng.randrange(3)
    return f"table: {table}. color of {names[k]}?", f"{names[k]} is {colors[k]}"


def _compare(rng: random.Random):
    if rng.random() < 0.5:
        a, b = rng.sample(range(100), 2)
        return f"which is larger: {a} or {b}", f"{max(a, b)} is larger than {min(a, b)}"
    words = rng.sample(_WORDS, rng.randint(2, 6))
    return f"count the words: {' '.join(words)}", str(len(words))


def _reverse(rng: random.Random):
    words = rng.sample(_WORDS, rng.randint(3, 4))
    return f"reverse the words: {' '.join(words)}", " ".join(reversed(words))


def _membership(rng: random.Random):
    words = rng.sample(_WORDS, rng.randint(3, 5))
    probe = rng.choice(words) if rng.random() < 0.5 else rng.choice([w for w in _WORDS if w not in words])
    answer = f"{probe} is in the list" if probe in words else f"{probe} is not in the list"
    return f"is {probe} in: {' '.join(words)}", answer


def _successor(rng: random.Random):
    a = rng.randint(0, 98)
    return f"what comes after {a}", f"{a + 1} comes after {a}"


GENERATORS = {"arithmetic": _arithmetic, "sorting": _sorting, "strings": _strings, "units": _units,
               "lookup": _lookup, "compare": _compare, "reverse": _reverse, "membership": _membership,
               "successor": _successor}


@dataclass
class DemoCorpus:
    train: list  # every training row {"prompt", "response", "family"} (the teacher's data)
    train_labelled: list  # the first labelled_fraction of `train`, with responses (the students' labels)
    train_prompts: list  # the rest of `train` as {"prompt", "family"} only (for on-policy distillation)
    eval: list  # held-out {"prompt", "response", "family"}; the response is the reference


def build_demo_corpus(n_train: int = 4000, n_eval: int = 300, labelled_fraction: float = 1.0,
                      seed: int = 0, families: tuple[str, ...] = FAMILIES) -> DemoCorpus:
    """Deterministic for a given (n_train, n_eval, labelled_fraction, seed); families in equal shares,
    round-robin, so every prefix of the rows is balanced too."""
    if not 0.0 <= labelled_fraction <= 1.0:
        raise ValueError(f"labelled_fraction must be in [0, 1], got {labelled_fraction}")
    unknown = sorted(set(families) - set(GENERATORS))
    if unknown or not families:
        raise ValueError(f"unknown demo task families {unknown} (known: {', '.join(GENERATORS)})")
    rng = random.Random(seed)
    seen: set[str] = set()
    rows = []
    attempts = 0
    while len(rows) < n_train + n_eval:
        family = families[len(rows) % len(families)]
        prompt, response = GENERATORS[family](rng)
        attempts += 1
        if attempts > 50 * (n_train + n_eval):
            raise ValueError(f"cannot draw {n_train + n_eval} distinct prompts")
        if prompt in seen:  # unique prompts: evaluation prompts can never occur in training
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "response": response, "family": family})
    # Rows are random draws in round-robin family order: the first n_eval are a balanced held-out set.
    eval_rows, train_rows = rows[:n_eval], rows[n_eval:]
    rng.shuffle(train_rows)
    n_labelled = round(labelled_fraction * len(train_rows))
    prompts = [{"prompt": r["prompt"], "family": r["family"]} for r in train_rows[n_labelled:]]
    return DemoCorpus(train=train_rows, train_labelled=train_rows[:n_labelled], train_prompts=prompts,
                      eval=eval_rows)


def write_demo_corpus(out_dir: str | Path, **kwargs) -> dict[str, Path]:
    """Write train.jsonl, train_labelled.jsonl, train_prompts.jsonl and eval.jsonl (atomically each)."""
    corpus = build_demo_corpus(**kwargs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in ("train", "train_labelled", "train_prompts", "eval"):
        path = out_dir / f"{name}.jsonl"
        tmp = path.with_suffix(".jsonl.partial")
        with open(tmp, "w", encoding="utf-8") as stream:
            for row in getattr(corpus, name):
                stream.write(json.dumps(row) + "\n")
        os.replace(tmp, path)
        paths[name] = path
    return paths
