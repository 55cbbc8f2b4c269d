"""Tests for minitpo/verifiable.py (the rule judge) and recipes/data/verifiable.jsonl (its instruction
set). Pure Python, no model: the file runs in well under a second. Expected credits are worked by hand
from the formulas in the checkers' docstrings."""

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from minitpo import verifiable as v

DATA_DIR = Path(__file__).resolve().parents[1] / "recipes" / "data"
ROWS = [json.loads(line) for line in (DATA_DIR / "verifiable.jsonl").read_text(encoding="utf-8").splitlines()]
INSTRUCTIONS = {row["instruction"] for row in ROWS}


def credit(kind, response, args=None):
    """Through the KINDS table, so that a checker wired to the wrong kind fails too."""
    return v.KINDS[kind].check(response, args)


def base_task(row):
    """The instruction minus its rendered constraint sentences; fails unless it ends with exactly those."""
    rendered = " " + " ".join(v.render(kind, args) for kind, args in row["constraints"])
    assert row["instruction"].endswith(rendered), row["instruction"]
    return row["instruction"][: -len(rendered)]


def numbered(n):
    return " ".join(f"w{i}" for i in range(n))  # n distinct words


# ------------------------------------------------------------------------------------------ checkers

def test_words_counts_contractions_once_and_hyphenated_words_twice():
    assert v.words("I don't know, well-known 3.5 ideas.") == ["I", "don't", "know", "well", "known", "3", "5", "ideas"]


def test_max_words():
    assert credit("max_words", numbered(30), 30) == 1.0  # the limit itself is within it
    assert credit("max_words", "just three words", 30) == 1.0
    assert credit("max_words", numbered(33), 30) == pytest.approx(30 / 33)
    assert credit("max_words", numbered(90), 30) == pytest.approx(1 / 3)


def test_min_words():
    assert credit("min_words", numbered(20), 20) == 1.0
    assert credit("min_words", numbered(50), 20) == 1.0
    assert credit("min_words", numbered(18), 20) == pytest.approx(0.9)
    assert credit("min_words", numbered(5), 20) == pytest.approx(0.25)


def test_max_sentences():
    assert v.sentences("It costs 3.5 dollars. Really!\n- a bullet line") == ["It costs 3.5 dollars", " Really", "- a bullet line"]
    assert credit("max_sentences", "One idea. Another idea!", 2) == 1.0
    assert credit("max_sentences", "One. Two. Three?", 2) == pytest.approx(2 / 3)
    assert credit("max_sentences", "A. B. C. D. E. F.", 2) == pytest.approx(1 / 3)


def test_keywords_are_whole_words_in_any_case():
    assert credit("keywords", "Sun and RAIN today.", ["sun", "rain"]) == 1.0
    assert credit("keywords", "A sunny day with rain.", ["sun", "rain"]) == 0.5  # "sunny" is not "sun"
    assert credit("keywords", "Clouds only.", ["sun", "rain", "wind"]) == 0.0


def test_forbidden_word():
    assert credit("forbidden_word", "Everything is fine.", "very") == 1.0  # inside a word does not count
    assert credit("forbidden_word", "Very nice.", "very") == 0.5
    assert credit("forbidden_word", "very very nice, very", "very") == 0.25


def test_bullets():
    assert credit("bullets", "Tips:\n- drink water\n  * sleep early\n- walk", 3) == 1.0
    assert credit("bullets", "- drink water\n- sleep early", 3) == pytest.approx(2 / 3)
    assert credit("bullets", "\n".join(f"- tip {i}" for i in range(6)), 3) == 0.5
    assert credit("bullets", "**Bold** start\n---\n-no space\n1. numbered", 3) == 0.0  # none of these is a bullet


def test_paragraphs():
    assert credit("paragraphs", "First part.\n\nSecond part.", 2) == 1.0
    assert credit("paragraphs", "One.\n  \nTwo.\n\n\nThree.", 2) == pytest.approx(2 / 3)  # a blank line may hold spaces
    assert credit("paragraphs", "One line.\nStill the same paragraph.", 2) == 0.5
    assert credit("paragraphs", "Just one.", 3) == pytest.approx(1 / 3)


def test_lowercase():
    assert credit("lowercase", "all lower, with 3 digits!") == 1.0
    assert credit("lowercase", "Hello world") == pytest.approx(9 / 10)  # 1 capital in 10 letters
    assert credit("lowercase", "HELLO") == 0.0
    assert credit("lowercase", "123 !!") == 0.0  # no letters: nothing obeyed


def test_uppercase():
    assert credit("uppercase", "ALL CAPS, 100%!") == 1.0
    assert credit("uppercase", "HELLo") == pytest.approx(4 / 5)
    assert credit("uppercase", "hello") == 0.0


def test_start_with():
    phrase = "Here you go:"
    assert credit("start_with", "  Here you go: three tips.", phrase) == 1.0  # leading space ignored
    assert credit("start_with", "here you go - three tips.", phrase) == 0.75  # its words, other case
    assert credit("start_with", "Well, here you go: three tips.", phrase) == 0.5  # its words, not at the start
    assert credit("start_with", "You need three tips.", phrase) == pytest.approx(0.25 / 3)  # "you" of 3 words
    assert credit("start_with", "Three tips.", phrase) == 0.0


def test_end_with():
    phrase = "Thanks for reading."
    assert credit("end_with", "Tea is good. Thanks for reading.\n", phrase) == 1.0
    assert credit("end_with", "Tea is good. Thanks for reading!", phrase) == 0.75
    assert credit("end_with", "Thanks for reading. Tea is good.", phrase) == 0.5
    assert credit("end_with", "Reading about tea is fun.", phrase) == pytest.approx(0.25 / 3)
    assert credit("end_with", "Tea is good.", phrase) == 0.0


def test_no_commas():
    assert credit("no_commas", "Bread and butter.") == 1.0
    assert credit("no_commas", "Bread, butter.") == 0.5
    assert credit("no_commas", "a, b, c, d") == 0.25


def test_json():
    assert credit("json", '{"tips": ["drink water", "sleep"]}') == 1.0
    assert credit("json", '```json\n[1, 2]\n```') == 1.0  # fences allowed
    assert credit("json", 'Here it is: {"tip": "sleep"} Enjoy.') == 0.5  # JSON with text around it
    assert credit("json", '"just a string"') == 0.25  # valid JSON, but a bare scalar
    assert credit("json", '{"tip": "sleep",') == 0.25  # starts like JSON, does not parse
    assert credit("json", "Drink water.") == 0.0


def test_title():
    assert credit("title", "<<Sunny Days>>\nIt was warm.") == 1.0
    assert credit("title", "# Sunny Days\nIt was warm.") == 0.5
    assert credit("title", "<Sunny Days>\nIt was warm.") == 0.5
    assert credit("title", "<<  >> It was warm.") == 0.0  # an empty title is no title
    assert credit("title", "It was warm.") == 0.0


# ------------------------------------------------------------------------------ phrasings and counts

def test_render_writes_the_canonical_sentences():
    assert v.render("max_words", 50) == "Answer in at most 50 words."
    assert v.render("max_sentences", 1) == "Use at most 1 sentence."
    assert v.render("keywords", ["sun"]) == 'Include the word "sun".'
    assert v.render("keywords", ["sun", "rain", "wind"]) == 'Include the words "sun", "rain" and "wind".'
    assert v.render("end_with", "Stay curious!") == 'End your answer with the exact phrase "Stay curious!".'
    assert v.render("no_commas") == "Do not use any commas."


def test_constraints_of_finds_sentences_anywhere_in_order():
    text = ('Please do not use any commas. Then describe the sea; answer in at most 30 words. '
            'Include the words "blue" and "deep". Thank you.')
    assert v.constraints_of(text) == [("no_commas", None), ("max_words", 30), ("keywords", ["blue", "deep"])]
    assert v.constraints_of("Describe the sea in a few words.") == []


def test_pass_counts():
    instruction = 'Describe the sea. Answer in at most 10 words. Include the words "blue" and "deep". Do not use any commas.'
    assert v.pass_counts(instruction, "The sea is blue and deep.") == (3, 3)
    assert v.pass_counts(instruction, "The sea is blue, wide and calm.") == (1, 3)  # only the word limit
    assert v.pass_counts("Describe the sea.", "The sea is blue and deep.") == (0, 0)


def test_score_is_one_plus_nine_times_the_mean_credit():
    instruction = 'Describe the sea. Answer in at most 10 words. Include the words "blue" and "deep".'
    # 8 words (credit 1.0), "blue" but not "deep" (0.5): 1 + 9 * 0.75
    assert v.score(instruction, "The sea is blue, wide and calm today.") == pytest.approx(7.75)
    assert v.score(instruction, "The sea is blue and deep.") == 10.0


def test_instruction_without_constraints_scores_a_constant_for_genuine_answers():
    instruction = "Describe the sea."
    assert v.score(instruction, "The sea is wide and restless, grey in winter.") == v.NO_CONSTRAINT_SCORE == 5.5
    assert v.score(instruction, "Waves crash on the rocks below the old lighthouse.") == 5.5
    assert v.score(instruction, "") == 0.0


# ------------------------------------------------------------------------------------ the data set

def test_every_instruction_parses_back_to_its_constraints():
    for row in ROWS:
        constraints = [[kind, args] for kind, args in v.constraints_of(row["instruction"])]
        assert constraints == row["constraints"], row["instruction"]
        base = base_task(row)
        assert base[-1:] in (".", "?") and v.constraints_of(base) == [], base  # a task, with no constraint of its own


def test_the_set_is_large_spread_and_uses_every_kind():
    assert len(ROWS) >= 240
    assert len(INSTRUCTIONS) == len(ROWS)  # no duplicates
    categories = Counter(row["category"] for row in ROWS)
    assert len(categories) >= 8 and max(categories.values()) <= 1.5 * min(categories.values()), categories
    kinds = Counter(kind for row in ROWS for kind, _ in row["constraints"])
    assert set(kinds) == set(v.KINDS) and min(kinds.values()) >= 10, kinds
    assert {len(row["constraints"]) for row in ROWS} == {2, 3}  # one alone ties too often (make_verifiable.py)
    assert len({base_task(row) for row in ROWS}) >= 240  # distinct base tasks, not one task with many constraint sets


def test_the_file_is_what_make_verifiable_writes():
    spec = importlib.util.spec_from_file_location("make_verifiable", DATA_DIR / "make_verifiable.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.build() == ROWS


# ---------------------------------------------------------------------------------------- anti-gaming

# Instructions of the set, each with a hand-written answer that meets every constraint and one that
# answers the task but meets none.
CASES = [
    ('Describe how to make a simple tomato sauce. Write your whole answer in capital letters only. Include '
     'the words "salt" and "taste".',
     "WARM OLIVE OIL IN A PAN AND COOK A CHOPPED ONION UNTIL SOFT. ADD GARLIC, THEN CRUSHED TOMATOES. "
     "SIMMER FOR TWENTY MINUTES, ADD SALT AND PEPPER, AND TASTE BEFORE SERVING.",
     "Warm olive oil in a pan, cook a chopped onion, add crushed tomatoes and simmer for twenty minutes."),
    ('List the ingredients for a simple vegetable soup. End your answer with the exact phrase "Thanks for '
     'reading.". Use exactly 2 bullet points in markdown format.',
     "- Carrots, onions, celery and potatoes, chopped small.\n- Vegetable stock, a bay leaf, salt and "
     "pepper.\nThanks for reading.",
     "You need carrots, onions, celery, potatoes and some vegetable stock."),
    ('Suggest ways to eat more vegetables without noticing. Format your whole answer as valid JSON. Include '
     'the words "body" and "sleep".',
     '{"ideas": ["Blend spinach into a fruit smoothie", "Grate carrots into pasta sauce", '
     '"Your body gets more fiber and you may sleep better"]}',
     "Hide grated carrots in pasta sauce and blend spinach into smoothies."),
    ('Explain what a brand logo should communicate. Start your answer with the exact phrase "Here you go:". '
     'Do not use the word "great". Include the word "local".',
     "Here you go: A logo should tell people at a glance what a business stands for. A bakery might show "
     "warm bread to signal fresh, local food, and a bank might use calm blue shapes to suggest trust.",
     "A great logo shows what a company stands for. Great logos are simple and easy to remember."),
    ('Give tips for teaching children about money. Use exactly 3 bullet points in markdown format. End your '
     'answer with the exact phrase "That is all for now.". Answer in at most 60 words.',
     "- Give them a small weekly allowance.\n- Use three jars: spend, save and share.\n- Let them pay at "
     "the shop counter.\nThat is all for now.",
     "Children learn about money best by handling it themselves. A small weekly allowance lets them make "
     "choices and mistakes while the amounts are low. Three jars, one to spend, one to save and one to "
     "share, make the idea of a budget visible. Letting them pay at the shop counter, count the change "
     "and compare prices teaches them more than any lecture about saving ever could."),  # over 60 words, no bullets
    ('Suggest ways to save for a holiday. Start your answer with the exact phrase "Let me explain.". End your '
     'answer with the exact phrase "That is all for now.".',
     "Let me explain. Open a separate savings account for the trip and move a fixed amount into it every "
     "payday. Cook at home more often and put what you save toward the holiday. That is all for now.",
     "Put a little money aside every month and cook at home more often."),
]


def degenerate_responses(instruction):
    keywords = [args for kind, args in v.constraints_of(instruction) if kind == "keywords"]
    responses = {"empty": "", "blank": "  \n\t", "echo": instruction, "echo upper": instruction.upper(),
                 "echo wrapped": f"Sure! {instruction} Okay.", "one word x50": " ".join(["yes"] * 50),
                 "phrase x20": " ".join(["fresh bread daily"] * 20)}
    if keywords:
        responses["keywords"] = " ".join(keywords[0])
        responses["keyword bullets"] = "\n".join(f"- {w}" for w in keywords[0] * 2)
        responses["keyword x50"] = " ".join([keywords[0][0]] * 50)
    return responses


@pytest.mark.parametrize("instruction, meets_all, meets_none", CASES)
def test_genuine_answers_beat_degenerate_ones(instruction, meets_all, meets_none):
    assert instruction in INSTRUCTIONS, "the case must be an instruction of the set"
    met, total = v.pass_counts(instruction, meets_all)
    assert met == total >= 2
    assert v.pass_counts(instruction, meets_none) == (0, total)
    assert v.score(instruction, meets_all) == 10.0
    assert 1.0 <= v.score(instruction, meets_none) < 10.0
    for name, response in degenerate_responses(instruction).items():
        assert v.degenerate_reason(instruction, response) is not None, name
        assert v.score(instruction, response) == 0.0, name


def test_degenerate_reasons():
    instruction = CASES[0][0]
    assert v.degenerate_reason(instruction, "") == "empty"
    assert v.degenerate_reason(instruction, "salt taste") == "too short"
    assert v.degenerate_reason(instruction, "YES " * 50) == "repetitive"
    assert v.degenerate_reason(instruction, "The sun is hot. " * 10) == "repetitive"
    assert v.degenerate_reason(instruction, "TOMATO SAUCE SALT TASTE TOMATO") == "no new words"
    # the instruction copied back, plus a new sentence of 12 words: 22 of 34 words are a copy
    copy = f"{instruction} Ripe tomatoes and a slow simmer give the sauce its sweet flavor."
    assert v.degenerate_reason(instruction, copy) == "echoes the instruction"


def test_asked_for_phrases_are_not_an_answer_on_their_own():
    instruction = CASES[5][0]
    assert v.degenerate_reason(instruction, "Let me explain. That is all for now.") == "too short"


def test_genuine_short_answers_are_not_degenerate():
    question = "What is the capital of France? Answer in at most 20 words."
    assert v.score(question, "The capital of France is Paris.") == 10.0  # restating the task is not a copy
    assert v.score("Name the capital of France. Answer in at most 2 words.", "Paris, France") == 10.0
    assert v.score("Name the capital of France. Answer in at most 2 words.", "Paris") == 10.0  # as few as asked
    assert v.score("Name the capital of France.", "Paris") == 0.0  # no constraint asks for so few words


def test_the_judge_hook_loads_and_calls_score():
    from minitpo.config import JudgeConfig
    from minitpo.judges.python import score_responses

    cfg = JudgeConfig(type="python", function="minitpo.verifiable:score")
    instruction, meets_all, meets_none = CASES[3]
    scores = [r["score"] for r in score_responses(cfg, [instruction] * 3, [meets_all, meets_none, ""], progress=False)]
    assert scores == [10.0, pytest.approx(2.0), 0.0]  # meets_none: 1 + 9 * mean(0, 1/3 for two "great", 0)
