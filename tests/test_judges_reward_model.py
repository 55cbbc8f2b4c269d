"""Tests for minitpo/judges/reward_model.py on a tiny random Qwen2ForSequenceClassification (num_labels=1) saved
with the tiny tokenizer of recipes/tiny/policy; real transformers and real bitsandbytes 4-bit on CPU."""

import pytest
import torch

from minitpo.config import JudgeConfig
from minitpo.errors import UserError
from minitpo.judges.reward_model import load_reward_model, render, score_responses

INSTRUCTIONS = ["Name one thing a river carries.", "Describe a lamp.", "Why do foxes hunt at night?"]
RESPONSES = ["Water.", "A lamp is a small source of warm light, often on a desk.", "Because mice are out then."]


def _scores(cfg, instructions, responses, progress=False) -> list[float]:
    return [r["score"] for r in score_responses(cfg, instructions, responses, progress)]


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

    from tests.conftest import TINY

    tokenizer = AutoTokenizer.from_pretrained(TINY / "policy")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         max_position_embeddings=1024, pad_token_id=None)
    model = Qwen2ForSequenceClassification(config)
    path = tmp_path_factory.mktemp("reward")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _cfg(path, **kw):
    return JudgeConfig(type="reward_model", model=str(path), **kw)


def _last_token_scores(reward_dir, instructions, responses) -> list[float]:
    """Each chat rendering alone (no padding), its head applied to the last position's hidden state,
    without the classifier's pooling."""
    tokenizer, model = load_reward_model(_cfg(reward_dir), "cpu")
    out = []
    with torch.no_grad():
        for instruction, response in zip(instructions, responses):
            text, _ = render(tokenizer, instruction, response)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            out.append(float(model.score(model.model(input_ids=ids).last_hidden_state[0, -1])[0]))
    return out


def test_scores_are_the_last_token_head_for_any_batch_size(reward_dir):
    expected = _last_token_scores(reward_dir, INSTRUCTIONS, RESPONSES)
    assert len(set(expected)) == 3
    for batch_size in (1, 2, 3):  # 2 and 3 pad responses of different lengths in one batch
        scores = _scores(_cfg(reward_dir, batch_size=batch_size), INSTRUCTIONS, RESPONSES, progress=False)
        assert scores == pytest.approx(expected, abs=1e-5), batch_size
    assert _scores(_cfg(reward_dir), [], [], progress=False) == []


def test_scores_the_chat_rendering_at_its_last_token(reward_dir):
    tokenizer, model = load_reward_model(_cfg(reward_dir), "cpu")
    text, add_special = render(tokenizer, INSTRUCTIONS[0], RESPONSES[0])
    assert text == (f"<|im_start|>user\n{INSTRUCTIONS[0]}<|im_end|>\n"
                    f"<|im_start|>assistant\n{RESPONSES[0]}<|im_end|>\n") and not add_special
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        # the last position of the unpadded sequence, computed without the classifier's pooling
        hidden = model.model(input_ids=ids).last_hidden_state[0, -1]
        expected = float(model.score(hidden)[0])
    score = _scores(_cfg(reward_dir), INSTRUCTIONS[:1], RESPONSES[:1], progress=False)[0]
    assert score == pytest.approx(expected, abs=1e-5)


def test_nf4_variant_runs(reward_dir):
    scores = _scores(_cfg(reward_dir, quantization="nf4", batch_size=2), INSTRUCTIONS, RESPONSES,
                                progress=False)
    full = _scores(_cfg(reward_dir), INSTRUCTIONS, RESPONSES, progress=False)
    assert len(scores) == 3 and all(torch.isfinite(torch.tensor(scores)))
    assert scores != full  # it really is quantized


def test_missing_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="judge.model"):
        _scores(_cfg(tmp_path / "nope"), ["i"], ["r"], progress=False)


def test_input_ending_with_the_pad_token_is_still_scored_at_its_last_token(reward_dir, tmp_path):
    # pad = "\n" (byte token "Ċ"), which ends every chat rendering: the classifier's pooling would skip it
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    tokenizer.pad_token = "Ċ"
    tokenizer.save_pretrained(tmp_path)
    AutoModelForSequenceClassification.from_pretrained(reward_dir).save_pretrained(tmp_path)
    padded_with_newline = _scores(_cfg(tmp_path, batch_size=3), INSTRUCTIONS, RESPONSES, progress=False)
    reference = _scores(_cfg(reward_dir, batch_size=1), INSTRUCTIONS, RESPONSES, progress=False)
    assert padded_with_newline == pytest.approx(reference, abs=1e-5)


def test_judge_check_with_a_reward_model_counts_its_own_scores(reward_dir):
    """judge-check's verdicts are the reward model's score comparisons, item by item."""
    from minitpo.judges.check import check_judge, sanity_items

    items = sanity_items()[::17]  # 16 items, every kind (the kinds of a row are consecutive)
    result = check_judge(_cfg(reward_dir, batch_size=1), items, progress=False)  # unpadded, as below
    chosen = _scores(_cfg(reward_dir, batch_size=1), [it.prompt for it in items], [it.chosen for it in items])
    rejected = _scores(_cfg(reward_dir, batch_size=1), [it.prompt for it in items], [it.rejected for it in items])
    expected = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)]
    assert result["n"] == 16 and result["accuracy"] == pytest.approx(sum(expected) / 16)
    assert result["verdict_mass"] is None and len(result["kinds"]) == 4
