"""The adapter update (minitpo/train.py) on the tiny policy with a real NF4 base."""

import dataclasses

import pytest
import torch

from conftest import TINY
from minitpo.config import PolicyConfig, TrainConfig
from minitpo.model import load_policy
from minitpo.pairs import Pair
from minitpo.train import collate, evaluate, reference_logps, tokenize_pairs, train_adapter


def make_pairs(n=8):
    return [Pair(instruction_id=i, prompt=f"<|im_start|>user\nquestion {i}<|im_end|>\n<|im_start|>assistant\n",
                 chosen=f"Here is my thought process: think {i} Here is my response: good answer {i}",
                 rejected=f"bad bad {i}", chosen_score=1.0, rejected_score=None, chosen_index=0,
                 rejected_index=1, rejected_parsed=False, rejected_truncated=(i % 2 == 0)) for i in range(n)]


@pytest.fixture(scope="module")
def setup():
    model, tokenizer = load_policy(PolicyConfig(model=str(TINY / "policy"), quantization="nf4", lora_r=8), device="cpu")
    cfg = TrainConfig(lr=5e-3, epochs=1, batch_size=4, max_length=128, warmup_ratio=0.0, schedule="constant")
    examples, _ = tokenize_pairs(tokenizer, make_pairs(), cfg.max_length, tokenizer.eos_token_id)
    refs = reference_logps(model, examples, tokenizer.pad_token_id, cfg, "cpu")
    return model, tokenizer, cfg, examples, refs


def test_tokenize_truncates_the_prompt_side_or_skips(tiny_tokenizer):
    long_prompt = Pair(0, "word " * 200, "short answer", "other", 0.0, None, 0, 1, False, True)
    huge = Pair(1, "q", "word " * 300, "x", 0.0, None, 0, 1, False, False)
    (kept, skipped), truncated = tokenize_pairs(tiny_tokenizer, [long_prompt, huge], 64, tiny_tokenizer.eos_token_id)
    assert skipped is None and truncated == [True, False]
    assert len(kept.prompt_ids) + len(kept.chosen_ids) == 64
    assert kept.prompt_ids == tiny_tokenizer("word " * 200, add_special_tokens=False)["input_ids"][-len(kept.prompt_ids):]
    assert kept.chosen_ids[-1] == tiny_tokenizer.eos_token_id and kept.rejected_ids[-1] != tiny_tokenizer.eos_token_id


def test_collate_masks_only_completion_tokens():
    from minitpo.train import Example

    ex = [Example([1, 2, 3], [4, 5], [6]), Example([7], [8, 9, 10], [11, 12])]
    ids, attn, comp = collate(ex, pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 10, 0], [1, 2, 3, 6, 0], [7, 11, 12, 0, 0]]
    assert comp.int().tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0], [0, 0, 0, 1, 0], [0, 1, 1, 0, 0]]
    assert attn.sum(1).tolist() == [5, 4, 4, 3]


def test_reference_equals_policy_at_the_start(setup):
    model, tokenizer, cfg, examples, refs = setup
    metrics = evaluate(model, examples, refs, tokenizer.pad_token_id, cfg, "cpu")
    assert metrics["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-5)


def test_one_epoch_lowers_the_loss_changes_adapter_not_base(setup):
    model, tokenizer, cfg, examples, refs = setup
    before = evaluate(model, examples, refs, tokenizer.pad_token_id, cfg, "cpu")["loss"]
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    rows = []
    summary = train_adapter(model, examples, refs, tokenizer.pad_token_id, cfg, "cpu", log=rows.append)
    after = evaluate(model, examples, refs, tokenizer.pad_token_id, cfg, "cpu")["loss"]
    assert after < before
    assert summary["updates"] == len(rows) == 2
    params = dict(model.named_parameters())
    assert any(not torch.equal(params[n], v) for n, v in lora.items())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())  # NF4 base, norms, embeddings


def test_autocast_setting_resolves_per_device(monkeypatch):
    import minitpo.train as train

    assert train.autocast_dtype(TrainConfig(autocast="none"), "cuda") is None
    assert train.autocast_dtype(TrainConfig(autocast="bfloat16"), "cpu") == torch.bfloat16
    assert train.autocast_dtype(TrainConfig(), "cuda") == torch.bfloat16
    for native in (True, False):  # auto on a CPU follows its bf16 hardware, whichever CPU runs this test
        monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: native)
        assert train.autocast_dtype(TrainConfig(), "cpu") == (torch.bfloat16 if native else None)


def test_bf16_autocast_on_cpu_scores_close_to_float32_and_trains():
    """Both CPU paths, whatever this CPU has: bf16 autocast really runs (the numbers differ from
    float32), stays within bf16 rounding of them, and one epoch lowers the loss with float32 LoRA weights."""
    model, tokenizer = load_policy(PolicyConfig(model=str(TINY / "policy"), quantization="nf4", lora_r=8,
                                                lora_dropout=0.0), device="cpu")
    fp32 = TrainConfig(lr=5e-3, epochs=1, batch_size=4, max_length=128, warmup_ratio=0.0, schedule="constant",
                       autocast="none")
    bf16 = dataclasses.replace(fp32, autocast="bfloat16")
    examples, _ = tokenize_pairs(tokenizer, make_pairs(), fp32.max_length, tokenizer.eos_token_id)
    ref32 = reference_logps(model, examples, tokenizer.pad_token_id, fp32, "cpu")
    ref16 = reference_logps(model, examples, tokenizer.pad_token_id, bf16, "cpu")
    flat32, flat16 = torch.tensor(ref32).flatten(), torch.tensor(ref16).flatten()
    assert not torch.equal(flat32, flat16), "bf16 autocast must change the arithmetic"
    assert torch.allclose(flat16, flat32, rtol=0.02, atol=0.1)
    before = evaluate(model, examples, ref16, tokenizer.pad_token_id, bf16, "cpu")["loss"]
    assert before == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-5)  # policy = reference, same path
    summary = train_adapter(model, examples, ref16, tokenizer.pad_token_id, bf16, "cpu")
    assert evaluate(model, examples, ref16, tokenizer.pad_token_id, bf16, "cpu")["loss"] < before
    assert summary["autocast"] == "bfloat16"
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
