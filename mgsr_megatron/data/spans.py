"""Span priors for the span-correlation loss (method.md §3): which adjacent response tokens belong together.

An extractor turns a response text (plus the character offsets of its tokens) into TOKEN ranges
`[start, end)` — half-open, relative to the first response token, sorted, non-overlapping, each at least
2 tokens long (a span of one token has no adjacent pair to constrain). Extractors, by spec string:

    phrase     (default) deterministic shallow chunker without dependencies: punctuation and English
               function words split the text; each maximal run of content words is a phrase; phrases that
               cover two or more tokens become spans ("the quick brown fox" -> "quick brown fox").
    nltk       noun, verb and prepositional phrase chunks from NLTK's POS tagger and a regexp grammar;
               needs `nltk` and its `averaged_perceptron_tagger_eng` data (a clear error otherwise).
    window:N   consecutive non-overlapping windows of N tokens (the last one kept if >= 2 tokens).
    word       the sub-word pieces of one word (words split into two or more tokens).

Character spans become token ranges through the tokenizer's offsets: a token belongs to a span when its
character interval overlaps the span's (leading whitespace that a SentencePiece piece carries is part of
its interval, so "▁quick" belongs to the span starting at "quick", and a span never reaches into the
next word's piece); a token of whitespace only (SentencePiece's lone "▁" before digits) belongs with
the token after it.
"""

from __future__ import annotations

import re

from mgsr_megatron.errors import UserError

# Closed-class English words: articles, prepositions, conjunctions, pronouns, auxiliaries, negation.
# They split phrases the way a shallow chunker splits NPs at determiners and clause boundaries.
FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every no
of in on at to for with by from into onto over under about as than via per between through during
before after above below up down out off upon within without against among across along around
and or but nor so yet if then because while although though whether when where how why what which who
whom whose i you he she it we they me him her us them my your his its our their mine yours ours theirs
is are was were be been being am do does did done has have had will would can could shall should may
might must not there here also just very too only
""".split())

_WORD = re.compile(r"\w+(?:['’]\w+)*")
_NLTK_GRAMMAR = r"""
  NP: {<DT|PRP\$|POS>?<JJ.*|CD|VBG|VBN>*<NN.*>+}
  PP: {<IN|TO><NP>}
  VP: {<MD>?<VB.*>+<RB.*>?<NP|PP>*}
"""
_NLTK_TAGGER_DATA = "averaged_perceptron_tagger_eng"


def char_spans_to_token_ranges(char_spans, offsets, text: str | None = None,
                               min_tokens: int = 2) -> list[tuple[int, int]]:
    """Map character spans [a, b) to token ranges [i, j) with `offsets[k] = (start, end)` per token.

    With `text`, a token that covers only whitespace (or nothing — SentencePiece's lone "▁" before a
    digit is zero-width) joins the token after it: it is that word's word-start marker."""
    if text is not None:
        offsets = list(offsets)
        for k in range(len(offsets) - 2, -1, -1):
            start, end = offsets[k]
            if text[start:end].strip() == "":
                offsets[k] = (start, max(end, offsets[k + 1][0] + 1, start + 1))
    ranges = []
    for span_start, span_end in char_spans:
        covered = [k for k, (start, end) in enumerate(offsets) if start < span_end and end > span_start]
        if covered:
            ranges.append((covered[0], covered[-1] + 1))
    return clean_spans(ranges, min_tokens)


def clean_spans(ranges, min_tokens: int = 2) -> list[tuple[int, int]]:
    """Sort, clip overlaps (a token shared by two spans stays in the first) and drop short ranges."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start < out[-1][1]:
            start = out[-1][1]
        if end - start >= min_tokens:
            out.append((start, end))
    return out


def phrase_char_spans(text: str) -> list[tuple[int, int]]:
    """Maximal runs of content words separated only by whitespace (function words and punctuation split)."""
    spans = []
    run_start = run_end = None
    for match in _WORD.finditer(text):
        is_function = match.group().lower() in FUNCTION_WORDS
        joined = run_end is not None and text[run_end:match.start()].strip() == ""
        if run_start is not None and (is_function or not joined):
            spans.append((run_start, run_end))
            run_start = run_end = None
        if not is_function:
            if run_start is None:
                run_start = match.start()
            run_end = match.end()
    if run_start is not None:
        spans.append((run_start, run_end))
    return spans


def word_char_spans(text: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in _WORD.finditer(text)]


def _nltk_tagger():
    try:
        import nltk
    except ImportError:
        raise UserError("span extractor 'nltk' needs the nltk package (pip install nltk), "
                        "or use data.span_extractor=phrase") from None
    try:
        nltk.data.find(f"taggers/{_NLTK_TAGGER_DATA}/")
    except LookupError:
        raise UserError(f"span extractor 'nltk' needs NLTK's tagger data '{_NLTK_TAGGER_DATA}', which is "
                        f"not installed (python -m nltk.downloader {_NLTK_TAGGER_DATA}), "
                        f"or use data.span_extractor=phrase") from None
    return nltk.pos_tag


def nltk_char_spans(text: str, tagger=None) -> list[tuple[int, int]]:
    """NP/VP/PP chunks. `tagger(words) -> [(word, tag)]` defaults to NLTK's perceptron tagger."""
    import nltk

    tagger = tagger or _nltk_tagger()
    words = list(_WORD.finditer(text))
    if not words:
        return []
    tagged = tagger([m.group() for m in words])
    # Carry each word's character interval through the chunker as part of its leaf.
    leaves = [((m.start(), m.end()), tag) for m, (_, tag) in zip(words, tagged)]
    tree = nltk.RegexpParser(_NLTK_GRAMMAR).parse(leaves)
    spans = []
    for node in tree:
        if isinstance(node, nltk.Tree):
            intervals = [leaf[0] for leaf in node.leaves()]
            spans.append((intervals[0][0], intervals[-1][1]))
    return spans


class SpanExtractor:
    """`extractor(text, offsets) -> [(start, end), ...]` token ranges (see the module docstring)."""

    def __init__(self, spec: str):
        self.spec = spec
        self.window = None
        self.tagger = None
        if spec.startswith("window:"):
            try:
                self.window = int(spec.split(":", 1)[1])
            except ValueError:
                self.window = 0
            if self.window < 2:
                raise UserError(f"data.span_extractor: '{spec}' needs a window of at least 2 tokens (window:N)")
        elif spec == "nltk":
            self.tagger = _nltk_tagger()  # fail at start-up, not at the first batch
        elif spec not in ("phrase", "word"):
            raise UserError(f"data.span_extractor: unknown extractor '{spec}' (phrase | nltk | window:N | word)")

    def __call__(self, text: str, offsets) -> list[tuple[int, int]]:
        if self.window is not None:
            n = len(offsets)
            return clean_spans([(i, min(i + self.window, n)) for i in range(0, n, self.window)])
        if self.spec == "phrase":
            char_spans = phrase_char_spans(text)
        elif self.spec == "word":
            char_spans = word_char_spans(text)
        else:
            char_spans = nltk_char_spans(text, self.tagger)
        return char_spans_to_token_ranges(char_spans, offsets, text)


def get_span_extractor(spec: str = "phrase") -> SpanExtractor:
    return SpanExtractor(spec)


def offsets_from_ids(tokenizer, ids) -> tuple[str, list[tuple[int, int]]]:
    """Text and per-token character offsets of GENERATED ids (no original text exists to align with).

    Decodes growing prefixes: token k covers decode(ids[:k]) .. decode(ids[:k+1]) of the full text,
    clipped to be monotonic (byte-level pieces of one character decode to nothing until complete).
    """
    ids = [int(i) for i in ids]
    text = tokenizer.decode(ids)
    offsets, previous = [], 0
    for k in range(len(ids)):
        end = min(len(tokenizer.decode(ids[:k + 1])), len(text))
        end = max(end, previous)
        offsets.append((previous, end))
        previous = end
    return text, offsets


def spans_for_ids(extractor: SpanExtractor, tokenizer, response_ids) -> list[tuple[int, int]]:
    """Online span priors for a generated response (token ids, EOS and anything after it excluded)."""
    ids = [int(i) for i in response_ids]
    if tokenizer.eos_id in ids:
        ids = ids[:ids.index(tokenizer.eos_id)]
    text, offsets = offsets_from_ids(tokenizer, ids)
    return extractor(text, offsets)
