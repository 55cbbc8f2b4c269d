"""The thought templates and the thought/response split (minitpo/prompts.py)."""

from dataclasses import replace

import pytest

from minitpo.config import ThoughtConfig
from minitpo.errors import UserError
from minitpo.prompts import (DIRECT, GENERIC, SPECIFIC, THINK, build_messages, build_prompt, load_template,
                             prefilled_chat_template, split_output)


def test_generic_split_strips_the_thought_prefix():
    text = "Here is my thought process: plan it. Here is my response: The answer."
    assert split_output(text, GENERIC) == ("plan it.", "The answer.")


def test_specific_split_on_r_marker():
    assert split_output("draft: x. evaluation: fine. <R> Final answer", SPECIFIC) == (
        "draft: x. evaluation: fine.", "Final answer")


@pytest.mark.parametrize("text", [
    "no marker at all",                                       # the model ignored the format
    "thoughts <R>",                                           # empty response
    "thoughts <R>   \n ",                                     # whitespace-only response
    "a <R> b <R> c",                                          # two markers: ambiguous split
    "",
])
def test_specific_parse_failures(text):
    assert split_output(text, SPECIFIC) is None


def test_generic_thought_after_response_is_a_failure():
    text = "Here is my response: hi Here is my thought process: oops"
    assert split_output(text, GENERIC) is None


def test_response_never_contains_marker_or_thought():
    text = "Here is my thought process: secret plan Here is my response: visible"
    thought, response = split_output(text, GENERIC)
    assert "Here is my response:" not in response and "secret plan" not in response
    assert thought == "secret plan"


def test_empty_thought_is_allowed_for_generic():
    assert split_output("Here is my response: just this", GENERIC) == ("", "just this")


@pytest.mark.parametrize("text, split", [
    ("<think>plan it</think>The answer.", ("plan it", "The answer.")),
    ("<think>\nplan it\n</think>\n\nThe answer.\n", ("plan it", "The answer.")),  # newlines around both parts
    ("plan it</think>The answer.", ("plan it", "The answer.")),  # no opening tag (a pre-filled <think>)
    ("</think>The answer.", ("", "The answer.")),                # an empty thought is allowed
    ("<think></think> The answer.", ("", "The answer.")),
    ("<think>a < b, so </think>a is smaller", ("a < b, so", "a is smaller")),  # other angle brackets are text
    ("<think>plan it</think>", None),                            # no response
    ("<think>plan it</think>  \n", None),                       # a blank response
    ("<think>plan it", None),                                    # the thought never closed
    ("The answer.", None),                                       # no thought format at all
    ("<think>a</think>b</think>c", None),                        # two closing tags: which part is shown?
    ("</think>b<think>c", None),                                 # a thought after the response
    ("<think>a</think>b <think>c</think> d", None),
])
def test_think_split(text, split):
    assert split_output(text, THINK) == split


def test_think_template_names_both_tags():
    assert "<think>" in THINK.text and "</think>" in THINK.text and THINK.marker == "</think>"
    system, user = build_messages(THINK, "Name a color.", system_prompt=True)
    assert "</think>" in system["content"] and user["content"] == "Name a color."


def test_direct_template_has_no_thought():
    assert split_output("  The answer.  ", DIRECT) == ("", "The answer.")
    assert split_output("   ", DIRECT) is None


def test_prompt_goes_through_the_chat_template(tiny_tokenizer):
    prompt = build_prompt(tiny_tokenizer, GENERIC, "Name a colour.")
    assert "User query: Name a colour." in prompt
    assert prompt.startswith("<|im_start|>user") and prompt.rstrip().endswith("<|im_start|>assistant")


def test_system_prompt_variant_moves_the_instructions():
    system, user = build_messages(GENERIC, "Name a colour.", system_prompt=True)
    assert system["role"] == "system" and "Here is my response:" in system["content"]
    assert "{instruction}" not in system["content"] and "User query" not in system["content"]
    assert user == {"role": "user", "content": "Name a colour."}


def test_custom_template_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("Think, then answer after ANSWER:\n{instruction}")
    t = load_template(ThoughtConfig(template=str(path), marker="ANSWER:", min_words=3))
    assert split_output("hmm ANSWER: 42", t) is None  # a one-word thought, under thought.min_words
    assert split_output("hmm, let me see ANSWER: 42", t) == ("hmm, let me see", "42")
    with pytest.raises(UserError, match="thought.marker"):
        load_template(ThoughtConfig(template=str(path), marker=None))
    with pytest.raises(UserError, match="does not appear"):
        load_template(ThoughtConfig(template=str(path), marker="<R>"))
    (tmp_path / "bad.txt").write_text("no placeholder")
    with pytest.raises(UserError, match="placeholder"):
        load_template(ThoughtConfig(template=str(tmp_path / "bad.txt"), marker="x"))


def test_word_count_counts_runs_of_non_space_across_tabs_and_newlines():
    from minitpo.prompts import word_count

    assert word_count("  Let me\tthink it\nthrough -- twice. ") == 7  # Let me think it through -- twice.: "--" is a word: no punctuation rules
    assert word_count("") == word_count(" \n\t ") == 0


def test_prefill_opens_the_thought_after_the_assistant_start(tiny_tokenizer):
    t = load_template(ThoughtConfig(template="think", prefill=True))
    plain = build_prompt(tiny_tokenizer, THINK, "Name a colour.")
    assert plain.endswith("<|im_start|>assistant\n")
    assert build_prompt(tiny_tokenizer, t, "Name a colour.") == plain + "<think>\n"
    # the model's text starts inside the thought: it splits as a whole output did
    assert split_output("Red is a colour.\n</think>\nRed.", t) == ("Red is a colour.", "Red.")
    assert split_output("</think>\nRed.", replace(t, min_words=1)) is None  # closed at once: a format failure

    class NoTemplate:
        chat_template = None
    assert build_prompt(NoTemplate(), t, "Name a colour.").endswith("User query: Name a colour.\n<think>\n")


def test_prefilled_chat_template_gives_the_training_prompt(tiny_tokenizer):
    """What an exported model carries: transformers, rendering the prefilled template itself, writes the prompt
    minitpo trained on, and only a generation prompt gets the opening."""
    import copy

    t = load_template(ThoughtConfig(template="think", prefill=True))
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = prefilled_chat_template(tiny_tokenizer.chat_template, t)
    messages = build_messages(t, "Name a colour.")
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        build_prompt(tiny_tokenizer, t, "Name a colour.")
    done = messages + [{"role": "assistant", "content": "Red."}]
    assert tok.apply_chat_template(done, tokenize=False) == tiny_tokenizer.apply_chat_template(done, tokenize=False)
    assert prefilled_chat_template("{{ x }}", THINK) == "{{ x }}"  # no prefill: the template as it was


@pytest.mark.parametrize("template", ["specific", "direct"])
def test_prefill_needs_a_thought_opening(template, tmp_path):
    with pytest.raises(UserError, match=f"thought.prefill: the {template} template has no thought opening"):
        load_template(ThoughtConfig(template=template, prefill=True))
    path = tmp_path / "t.txt"
    path.write_text("Think, then answer after ANSWER:\n{instruction}")
    with pytest.raises(UserError, match="thought.prefill: a template file"):
        load_template(ThoughtConfig(template=str(path), marker="ANSWER:", prefill=True))
