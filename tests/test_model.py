"""Loading the policy (minitpo/model.py): the bitsandbytes CPU trap of sampling-then-training."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, Qwen2Config

from minitpo.model import disable_bnb_cpu_weight_packing


def nf4_lora(path, family):
    cfg = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config((Qwen2Config if family == "qwen2" else LlamaConfig)(**cfg)).save_pretrained(path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32,
                                                device_map={"": "cpu"})
    disable_bnb_cpu_weight_packing(base)
    torch.manual_seed(1)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(base, LoraConfig(r=4, target_modules=targets, lora_dropout=0.0, init_lora_weights=False))


def lora_grads(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


# Qwen2 (linear layers with bias) crashed with "a view of a leaf Variable ... in-place operation";
# Llama trained with silently wrong gradients. Both only on CPUs with AVX512-BF16, where bitsandbytes
# repacks 4-bit weights for inference on the first eval, no-grad forward (see the function's docstring).
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_generate_then_train_gives_the_same_gradients(tmp_path, family):
    ids = torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    expected = lora_grads(nf4_lora(tmp_path / "a", family), ids)  # never ran an eval, no-grad forward
    model = nf4_lora(tmp_path / "b", family)
    model.eval()
    with torch.no_grad():
        model.generate(input_ids=ids[:1, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
    got = lora_grads(model, ids)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=0, rtol=0, msg=name)
