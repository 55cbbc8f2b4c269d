"""A rule judge for verifiable instructions (IFEval style, Zhou et al. 2023), for the recipe settings
`judge.type: python` and `judge.function: minitpo.verifiable:score`.

Consumes (instruction, response) strings and nothing else, so the constraints are read back from the
instruction: each one in recipes/data/verifiable.jsonl is a base task plus 2-3 constraint sentences in
the canonical phrasings below (KINDS), which `render` writes and `constraints_of` finds anywhere in a text.

    max_words N       Answer in at most N words.
    min_words N       Answer in at least N words.
    max_sentences N   Use at most N sentences.
    keywords [a, b]   Include the words "a" and "b".            (whole words, any case)
    forbidden_word w  Do not use the word "w".                  (whole word, any case)
    bullets N         Use exactly N bullet points in markdown format.     (lines starting "- " or "* ")
    paragraphs N      Write exactly N paragraphs; separate paragraphs with a blank line.
    lowercase         Write your whole answer in lowercase letters only, with no capital letters.
    uppercase         Write your whole answer in capital letters only.
    start_with "p"    Start your answer with the exact phrase "p".
    end_with "p"      End your answer with the exact phrase "p".
    no_commas         Do not use any commas.
    json              Format your whole answer as valid JSON.   (``` fences around it are allowed)
    title             Give your answer a title wrapped in double angular brackets, such as <<my title>>.

Produces a partial credit in [0, 1] per constraint, 1.0 exactly when it is met (formulas at each
checker), so that K candidates rarely tie; `pass_counts` is IFEval's strict (met, total). `score`, the
judge, is 1 + 9 * mean(credits) in [1, 10] for a genuine answer; NO_CONSTRAINT_SCORE when the
instruction has no recognised constraint (so all K tie and pairs.py pairs them only against a
degenerate one); and 0.0 for a degenerate response (`degenerate_reason`: empty, too short, a loop,
only the instruction's words, or a copy of it), because a rule judge is easy to game: an echo holds
every keyword, one word repeated meets lowercase and no_commas, two words meet every word limit.
Pure Python, deterministic, no model.
"""

import json
import re
import statistics
from dataclasses import dataclass
from functools import partial
from typing import Callable

NO_CONSTRAINT_SCORE = 5.5  # the middle of [1, 10]: no evidence either way
MIN_WORDS = 3  # fewer words is degenerate, unless a max_words constraint allows only fewer
MIN_NEW_WORD_FRACTION = 0.1  # below this, the response only reuses the instruction's words
MAX_ECHO_FRACTION = 0.5  # at or above this share of words inside copied 5-grams: an echo
MAX_REPEATED_4GRAM_FRACTION = 0.5  # above this share of repeated word 4-grams: a loop

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")  # "don't" is one word, "well-known" two


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def _lower_words(text: str) -> list[str]:
    return [w.lower() for w in words(text)]


def _count_credit(got: int, want: int) -> float:
    """1 - |got - want| / max(got, want): 1 when equal, 0 when got is 0, 0.5 for double or half."""
    return 1.0 - abs(got - want) / max(got, want, 1)


def _occurrences(text: str, word: str) -> int:
    return len(re.findall(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE))


# ------------------------------------------------------------------------------------------ checkers

def check_max_words(response: str, n: int) -> float:
    """1 within the limit, else n / words: 60 words against a limit of 30 get 0.5."""
    got = len(words(response))
    return 1.0 if got <= n else n / got


def check_min_words(response: str, n: int) -> float:
    """1 at or over the minimum, else words / n."""
    return min(1.0, len(words(response)) / n)


def sentences(text: str) -> list[str]:
    """Pieces ending at . ! ? followed by space, or at a line break, that hold a word. "3.5" is one
    piece; "e.g. this" is two (an over-count we accept for a rule judge)."""
    return [p for p in re.split(r"[.!?]+(?=\s|$)|\n", text) if words(p)]


def check_max_sentences(response: str, n: int) -> float:
    """1 within the limit, else n / sentences."""
    got = len(sentences(response))
    return 1.0 if got <= n else n / got


def check_keywords(response: str, keywords: list[str]) -> float:
    """The fraction of the keywords present, each as a whole word in any case."""
    return sum(_occurrences(response, w) > 0 for w in keywords) / len(keywords)


def check_forbidden_word(response: str, word: str) -> float:
    """1 / (1 + uses): one use 0.5, two uses 0.33."""
    return 1.0 / (1 + _occurrences(response, word))


def check_bullets(response: str, n: int) -> float:
    """_count_credit(lines starting "- " or "* ", n): 3 bullets for 4 asked get 0.75, none get 0."""
    bullets = re.findall(r"^[ \t]*[-*][ \t]+\S", response, re.MULTILINE)  # not "**bold**", not "---"
    return _count_credit(len(bullets), n)


def check_paragraphs(response: str, n: int) -> float:
    """_count_credit(blocks between blank lines, n): 1 paragraph for 3 asked gets 1/3."""
    blocks = [p for p in re.split(r"\n[ \t]*\n", response.strip()) if p.strip()]
    return _count_credit(len(blocks), n)


def _case_fraction(text: str, upper: bool) -> float:
    """lowercase / uppercase: the fraction of cased letters in that case (0 when there are none)."""
    cased = [c for c in text if c.islower() or c.isupper()]
    return sum(c.isupper() == upper for c in cased) / len(cased) if cased else 0.0


def _phrase_credit(response: str, phrase: str, at_end: bool) -> float:
    """start_with / end_with: 1 for the exact phrase at that end (surrounding space ignored); 0.75 for
    its words there with other case or punctuation; 0.5 for its words in a row elsewhere; else 0.25
    times the fraction of its distinct words found anywhere."""
    text = response.strip()
    if text.endswith(phrase) if at_end else text.startswith(phrase):
        return 1.0
    got, want = _lower_words(text), _lower_words(phrase)
    k = len(want)
    if (got[-k:] if at_end else got[:k]) == want:
        return 0.75
    if any(got[i:i + k] == want for i in range(len(got) - k + 1)):
        return 0.5
    return 0.25 * len(set(want) & set(got)) / len(set(want))


def check_no_commas(response: str, _=None) -> float:
    """1 / (1 + commas)."""
    return 1.0 / (1 + response.count(","))


_INVALID = object()  # not None: "null" is valid JSON


def _loads(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return _INVALID


def check_json(response: str, _=None) -> float:
    """1 when the whole response (inside optional ``` fences) is a JSON object or array; 0.5 when one
    parses from its first { or [ to its last } or ] with other text around it; 0.25 for a bare scalar
    such as one quoted string (valid JSON, which IFEval passes, but it formats nothing) or for text
    that starts like JSON and does not parse; else 0."""
    text = response.strip()
    fenced = re.fullmatch(r"```[a-zA-Z]*\s*\n?(.*?)\n?```", text, re.DOTALL)
    text = (fenced.group(1) if fenced else text).strip()
    value = _loads(text)
    if isinstance(value, (dict, list)):
        return 1.0
    for first, last in "{}", "[]":
        i, j = text.find(first), text.rfind(last)
        if 0 <= i < j and isinstance(_loads(text[i:j + 1]), (dict, list)):
            return 0.5
    return 0.25 if value is not _INVALID or text[:1] in ("{", "[") else 0.0


def check_title(response: str, _=None) -> float:
    """1 for a <<title>> holding a word; 0.5 for the near misses <title> or a markdown "# " heading."""
    if re.search(r"<<[^<>\n]*\w[^<>\n]*>>", response):
        return 1.0
    if re.search(r"<[^<>\n]*\w[^<>\n]*>|^[ \t]*#{1,6}[ \t]+\S", response, re.MULTILINE):
        return 0.5
    return 0.0


# ------------------------------------------------------------------------------ the canonical phrasings

@dataclass(frozen=True)
class Kind:
    # One template both renders and parses, so the two cannot drift apart. At most one argument slot:
    # {n} a number, {text} a quoted word or phrase, {list} quoted words; {s} is that argument's plural s.
    template: str
    check: Callable[[str, object], float]  # (response, args) -> partial credit in [0, 1]


KINDS: dict[str, Kind] = {
    "max_words": Kind("Answer in at most {n} word{s}.", check_max_words),
    "min_words": Kind("Answer in at least {n} word{s}.", check_min_words),
    "max_sentences": Kind("Use at most {n} sentence{s}.", check_max_sentences),
    "keywords": Kind("Include the word{s} {list}.", check_keywords),
    "forbidden_word": Kind("Do not use the word {text}.", check_forbidden_word),
    "bullets": Kind("Use exactly {n} bullet point{s} in markdown format.", check_bullets),
    "paragraphs": Kind("Write exactly {n} paragraph{s}; separate paragraphs with a blank line.",
                       check_paragraphs),
    "lowercase": Kind("Write your whole answer in lowercase letters only, with no capital letters.",
                      lambda r, _: _case_fraction(r, upper=False)),
    "uppercase": Kind("Write your whole answer in capital letters only.",
                      lambda r, _: _case_fraction(r, upper=True)),
    "start_with": Kind("Start your answer with the exact phrase {text}.", partial(_phrase_credit, at_end=False)),
    "end_with": Kind("End your answer with the exact phrase {text}.", partial(_phrase_credit, at_end=True)),
    "no_commas": Kind("Do not use any commas.", check_no_commas),
    "json": Kind("Format your whole answer as valid JSON.", check_json),
    "title": Kind("Give your answer a title wrapped in double angular brackets, such as <<my title>>.",
                  check_title),
}

_QUOTED = r'"([^"\n]+)"'
_SLOTS = {"n": r"(\d+)", "s": "s?", "text": _QUOTED, "list": r'("[^"\n]+"(?:(?:, | and )"[^"\n]+")*)'}


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, slot, literal, slot, ..., literal
    regex = "".join(_SLOTS[p] if i % 2 else re.escape(p) for i, p in enumerate(parts))
    return re.compile(regex, re.IGNORECASE)  # no anchors: the sentence may sit anywhere


_PATTERNS = {kind: _pattern(k.template) for kind, k in KINDS.items()}


def render(kind: str, args=None) -> str:
    """The canonical sentence: render("max_words", 50) == "Answer in at most 50 words."."""
    count = len(args) if isinstance(args, list) else args
    text = f'"{args}"' if isinstance(args, str) else None
    quoted = [f'"{w}"' for w in args] if isinstance(args, list) else None
    items = quoted and (quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1])
    return KINDS[kind].template.format(n=args, s="" if count == 1 else "s", text=text, list=items)


def _parse(kind: str, m: re.Match):
    template = KINDS[kind].template
    if "{n}" in template:
        return int(m.group(1))
    if "{list}" in template:
        return re.findall(_QUOTED, m.group(1))
    return m.group(1) if "{text}" in template else None


def constraints_of(instruction: str) -> list[tuple[str, object]]:
    """Every constraint sentence in the instruction, as (kind, args), in the order they appear."""
    found = [(m.start(), kind, _parse(kind, m))
             for kind, pattern in _PATTERNS.items() for m in pattern.finditer(instruction)]
    return [(kind, args) for _, kind, args in sorted(found, key=lambda f: f[0])]


def check(instruction: str, response: str) -> list[tuple[str, float]]:
    """(kind, partial credit) for each constraint of the instruction."""
    return [(kind, KINDS[kind].check(response, args)) for kind, args in constraints_of(instruction)]


def pass_counts(instruction: str, response: str) -> tuple[int, int]:
    """(constraints fully met, constraints): IFEval's strict count; (0, 0) with no constraint."""
    values = [v for _, v in check(instruction, response)]
    return sum(v == 1.0 for v in values), len(values)


# ------------------------------------------------------------------------------------------ the judge

def _ngrams(ws: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]


def _is_loop(ws: list[str]) -> bool:
    """One word, or a short phrase, over and over: it meets lowercase, no_commas and keywords for free."""
    if len(ws) >= 3 and len(set(ws)) == 1:
        return True
    grams = _ngrams(ws, 4)
    return len(ws) >= 8 and 1 - len(set(grams)) / len(grams) > MAX_REPEATED_4GRAM_FRACTION


def _copied_fraction(ws: list[str], instruction_ws: list[str]) -> float:
    """The share of the words that sit inside a word 5-gram of the instruction. Five words, not two or
    three, so that a genuine answer that restates a few words of its task is not taken for a copy."""
    copied = set(_ngrams(instruction_ws, 5))
    covered = set()
    for i, gram in enumerate(_ngrams(ws, 5)):
        if gram in copied:
            covered.update(range(i, i + 5))
    return len(covered) / len(ws)


def degenerate_reason(instruction: str, response: str) -> str | None:
    """Why a response scores 0.0, or None for a genuine answer. The phrases the instruction asks for
    verbatim (start_with, end_with) are taken out first: quoting them is obeying, not copying, and a
    response that is nothing but those phrases is then "too short"."""
    if not response.strip():
        return "empty"
    constraints = constraints_of(instruction)
    own = response
    for kind, args in constraints:
        if kind in ("start_with", "end_with"):
            own = own.replace(args, " ")
    ws = _lower_words(own)
    asks_for_few = any(kind == "max_words" and args < MIN_WORDS for kind, args in constraints)
    if len(ws) < (1 if asks_for_few else MIN_WORDS):
        return "too short"  # a two-word reply meets every word and sentence limit
    if _is_loop(ws):
        return "repetitive"
    instruction_ws = _lower_words(instruction)
    known = set(instruction_ws)
    if sum(w not in known for w in ws) / len(ws) < MIN_NEW_WORD_FRACTION:
        return "no new words"  # the keywords listed, the task restated: they meet keywords for free
    if _copied_fraction(ws, instruction_ws) >= MAX_ECHO_FRACTION:
        return "echoes the instruction"  # a copy with some text added
    return None


def score(instruction: str, response: str) -> float:
    """The judge: 0.0 for a degenerate response, else 1 + 9 * mean(partial credits) in [1, 10], or
    NO_CONSTRAINT_SCORE when the instruction has no recognised constraint."""
    if degenerate_reason(instruction, response) is not None:
        return 0.0
    values = [v for _, v in check(instruction, response)]
    return 1.0 + 9.0 * statistics.fmean(values) if values else NO_CONSTRAINT_SCORE
