"""`minitpo export --gguf` and `--gguf-lora`, checked against the real llama.cpp: the GGUF it loads gives
the next-token log-probabilities that transformers gives with the adapter, at every position of a
prompt. On the tiny policy (a transformers folder), on a tiny GGUF-sourced policy (the demos' case:
metadata and tokenizer copied from the source file), and on tiny random Qwen2 and Gemma 3 models.

How close is close enough (llama.cpp with an f32 KV cache, so that only the file is measured):
  f32     the largest |log p difference| over the vocabulary and the prompt < 1e-3 (measured 1.7e-5
          on the tiny policy, 3.4e-5 on Qwen2); Gemma 3 < 1e-2 (measured 5.8e-3; likely ggml's GELU, which reads a
          float16 table, while transformers computes the tanh form in float32);
  f16     KL(transformers || llama.cpp) at every position < 1e-3 (measured at most 2.2e-4);
  q8_0    that KL < 0.1 (measured 2.6e-3 on the tiny policy, 3.4e-2 on the random Qwen2, whose 0.3-std
          weights make its logits far sharper than a trained model's).
Each test also checks that the adapter moves the model by far more than the tolerance."""

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, TINY
from minitpo.cli import main as cli_main
from minitpo.export import export_gguf
from minitpo.gguf_export import TYPES, write_model_gguf
from minitpo.llamacpp import no_weight_repacking
from minitpo.recipe import load_recipe, recipe_to_dict
from minitpo.rundir import resolve_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXT = "<|im_start|>user\nThe red fox rests near the hill. Where is the fox?<|im_end|>\n<|im_start|>assistant\n"
F32 = 0  # GGML_TYPE_F32, for llama.cpp's KV cache: its default f16 cache alone moves log p by ~7e-3 here
TOL = {"f32": 1e-3, "f16": 1e-3, "q8_0": 0.1}


def distance(got, want, qtype):
    """The measure TOL bounds: max |log p difference| for f32, max KL(want || got) for the rounded types."""
    if qtype == "f32":
        return float((got - want).abs().max())
    return float((want.exp() * (want - got)).sum(-1).max())


def assert_close(got, want, qtype, base, arch="llama"):
    tol = 1e-2 if (arch, qtype) == ("gemma3", "f32") else TOL[qtype]
    assert distance(base, want, qtype) > 10 * tol, "the adapter must move the model by more than the tolerance"
    assert distance(got, want, qtype) < tol


# ------------------------------------------------------------------------------------------ helpers

def llama_logprobs(path, ids, lora=None):
    from llama_cpp import Llama

    with no_weight_repacking():
        llm = Llama(model_path=str(path), lora_path=None if lora is None else str(lora), n_ctx=128,
                    logits_all=True, verbose=False, type_k=F32, type_v=F32)
    try:
        llm.eval(ids)
        scores = np.array(llm.scores[:len(ids)], dtype=np.float64)
    finally:
        llm.close()
    return torch.log_softmax(torch.from_numpy(scores), -1)


def hf_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)


def peft_model(base, seed=0):
    """A LoRA on every block linear with B != 0 (init_lora_weights=False): the adapter changes the model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False,
                      task_type="CAUSAL_LM")
    return get_peft_model(base, lora).eval()


def load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def random_model(kind, out, tokenizer):
    """A tiny random Qwen2 (with q/k/v biases) or Gemma 3 (6 layers: 5 sliding, 1 global) folder with
    the tiny tokenizer."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=2, tie_word_embeddings=True, **common))
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(num_hidden_layers=6, head_dim=16, query_pre_attn_scalar=16,
                                                   sliding_window=8, **common))  # < the prompt: the window acts
    with torch.no_grad():  # random norms: a weight of exactly 1 (or 0 for Gemma) would hide a wrong +1
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.3 if kind == "gemma3" else 1.0, 0.2)
            else:
                p.normal_(0.0, 0.3)  # biases too; large enough that log-probs move away from uniform
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def bare_adapter(base_dir, out, seed=0):
    peft_model(load(base_dir), seed).save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def ids(tiny_tokenizer):
    return tiny_tokenizer(TEXT, add_special_tokens=False).input_ids


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory):
    return bare_adapter(TINY / "policy", tmp_path_factory.mktemp("adapters") / "tiny")


@pytest.fixture(scope="module")
def gguf_policy(tmp_path_factory, tiny_tokenizer):
    """The tiny policy written as an f32 GGUF (the source a GGUF-sourced run starts from), and a run's
    iteration folder whose recipe names it as policy.model, holding an adapter trained on it (random B)."""
    from minitpo.model import _source

    d = tmp_path_factory.mktemp("gguf_policy")
    source = d / "policy.gguf"
    write_model_gguf(load(TINY / "policy"), tiny_tokenizer, source, "llama", "f32")
    run = d / "run"
    peft_model(load(_source(str(source))), seed=2).save_pretrained(run / "iter-1" / "adapter")
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", [f"policy.model={source}", "policy.quantization=none"],
                         check_files=False)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    return source, run / "iter-1"


def reference(path):
    """transformers with the adapter of PATH, as minitpo loads it for chat and eval (float32)."""
    import dataclasses

    from minitpo.model import load_policy

    resolved = resolve_adapter(path)
    policy = dataclasses.replace(resolved.policy, quantization="none", dtype="float32")
    model, _ = load_policy(policy, resolved.adapter_dir, device="cpu")
    return model.eval()


# ------------------------------------------------------------------------------------- --gguf merged

@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0"])
def test_merged_gguf_matches_transformers_with_the_adapter(tiny_adapter, ids, tmp_path, qtype):
    out = export_gguf(tiny_adapter, tmp_path / "model.gguf", qtype)
    assert_close(llama_logprobs(out, ids), hf_logprobs(reference(tiny_adapter), ids), qtype,
                 base=hf_logprobs(load(TINY / "policy"), ids))


def test_gguf_sourced_policy_keeps_the_source_metadata(gguf_policy, ids, tmp_path):
    import gguf

    source, iteration = gguf_policy
    out = export_gguf(iteration, tmp_path / "model.gguf", "f16")
    assert_close(llama_logprobs(out, ids), hf_logprobs(reference(iteration), ids), "f16",
                 base=hf_logprobs(load(TINY / "policy"), ids))
    src, got = gguf.GGUFReader(source), gguf.GGUFReader(out)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template", "general.name",
                "llama.rope.freq_base"):
        assert got.fields[key].contents() == src.fields[key].contents(), key
    assert got.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    template = resolve_adapter(iteration).template  # the run's, for whoever runs the file
    assert got.fields["minitpo.thought_template"].contents() == template.text
    assert got.fields["minitpo.thought_marker"].contents() == template.marker
    assert [t.name for t in got.tensors] == [t.name for t in src.tensors]


def test_prefill_travels_in_the_exported_chat_template(gguf_policy, tiny_tokenizer, tmp_path):
    """With thought.prefill, llama-cpp-python's own chat formatter, reading the exported file's template, writes
    the prompt minitpo trained on (the thought's opening included); the merged transformers folder's
    tokenizer does too. Without it the source's template is kept (test above)."""
    import shutil

    import gguf
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from minitpo.export import export_merged
    from minitpo.prompts import build_messages, build_prompt
    from transformers import AutoTokenizer

    source, iteration = gguf_policy
    run = tmp_path / "run"
    shutil.copytree(iteration, run / "iter-1")
    recipe = load_recipe(iteration.parent / "recipe.yaml", ["thought.template=think", "thought.prefill=true"],
                         check_files=False)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    template = resolve_adapter(run / "iter-1").template
    want = build_prompt(tiny_tokenizer, template, "Name a colour.")
    assert want.endswith("assistant\n<think>\n")

    out = export_gguf(run / "iter-1", tmp_path / "model.gguf", "q8_0")
    chat = gguf.GGUFReader(out).fields["tokenizer.chat_template"].contents()
    assert chat != gguf.GGUFReader(source).fields["tokenizer.chat_template"].contents()
    formatter = Jinja2ChatFormatter(chat, eos_token="<|im_end|>", bos_token="", add_generation_prompt=True)
    assert formatter(messages=build_messages(template, "Name a colour.")).prompt == want

    lora = export_gguf(run / "iter-1", tmp_path / "lora.gguf", lora=True)  # runs under the base file's template
    assert "tokenizer.chat_template" not in gguf.GGUFReader(lora).fields

    merged = export_merged(run / "iter-1", tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(merged)
    assert tok.apply_chat_template(build_messages(template, "Name a colour."), tokenize=False,
                                   add_generation_prompt=True) == want


@pytest.mark.parametrize("kind", ["qwen2", "gemma3"])
def test_other_architectures(kind, tiny_tokenizer, ids, tmp_path):
    base = random_model(kind, tmp_path / kind, tiny_tokenizer)
    adapter = bare_adapter(base, tmp_path / "adapter")
    want, before = hf_logprobs(reference(adapter), ids), hf_logprobs(load(base), ids)
    for qtype in TYPES:
        out = export_gguf(adapter, tmp_path / f"model-{qtype}.gguf", qtype)
        assert_close(llama_logprobs(out, ids), want, qtype, base=before, arch=kind)


def test_llama3_rope_scaling(tiny_tokenizer, ids, tmp_path):
    """Llama 3.1-style rope scaling travels as the rope_freqs tensor llama.cpp expects."""
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(TINY / "policy")
    config.rope_parameters = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    torch.manual_seed(3)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    model.save_pretrained(tmp_path / "llama3")
    tiny_tokenizer.save_pretrained(tmp_path / "llama3")
    adapter = bare_adapter(tmp_path / "llama3", tmp_path / "adapter")
    out = export_gguf(adapter, tmp_path / "model.gguf", "f32")
    assert_close(llama_logprobs(out, ids), hf_logprobs(reference(adapter), ids), "f32",
                 base=hf_logprobs(load(tmp_path / "llama3"), ids))


# --------------------------------------------------------------------------------------- --gguf-lora

def test_lora_gguf_on_an_exported_base(tiny_adapter, tiny_tokenizer, ids, tmp_path):
    base = tmp_path / "base.gguf"
    write_model_gguf(load(TINY / "policy"), tiny_tokenizer, base, "llama", "f32")
    lora = export_gguf(tiny_adapter, tmp_path / "adapter.gguf", lora=True)
    assert_close(llama_logprobs(base, ids, lora=lora), hf_logprobs(reference(tiny_adapter), ids), "f32",
                 base=llama_logprobs(base, ids))  # without --lora, llama.cpp runs the base
    assert lora.stat().st_size < base.stat().st_size / 4


def test_lora_gguf_on_the_source_gguf(gguf_policy, ids, tmp_path):
    source, iteration = gguf_policy
    lora = export_gguf(iteration, tmp_path / "adapter.gguf", lora=True)
    assert_close(llama_logprobs(source, ids, lora=lora), hf_logprobs(reference(iteration), ids), "f32",
                 base=llama_logprobs(source, ids))


# -------------------------------------------------------------------------------------- user errors

def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr("sys.argv", ["minitpo", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        cli_main()
    return e.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("args, message", [
    (["--gguf", "--gguf-lora"], "pass one of them"),
    (["--type", "q8_0"], "add --gguf or drop --type"),
    (["--gguf", "--type", "q4"], "Invalid value for '--type'"),
])
def test_option_errors(monkeypatch, capsys, tiny_adapter, tmp_path, args, message):
    code, err = run_cli(monkeypatch, capsys, "export", tiny_adapter, tmp_path / "m.gguf", *args)
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not (tmp_path / "m.gguf").exists()


def test_out_errors(monkeypatch, capsys, tiny_adapter, tmp_path):
    (tmp_path / "there.gguf").write_text("keep me")
    code, err = run_cli(monkeypatch, capsys, "export", tiny_adapter, tmp_path / "there.gguf", "--gguf")
    assert code == 2 and "already exists" in err[0] and (tmp_path / "there.gguf").read_text() == "keep me"
    code, err = run_cli(monkeypatch, capsys, "export", tiny_adapter, tmp_path / "model.bin", "--gguf")
    assert code == 2 and "does not end in .gguf" in err[0]


def test_unsupported_architecture_is_one_line_before_loading(monkeypatch, capsys, tiny_tokenizer, tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    base = tmp_path / "mistral"
    MistralForCausalLM(MistralConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    adapter = bare_adapter(base, tmp_path / "adapter")
    code, err = run_cli(monkeypatch, capsys, "export", adapter, tmp_path / "m.gguf", "--gguf")
    assert code == 2 and len(err) == 1 and "is a MistralForCausalLM" in err[0] and "LlamaForCausalLM" in err[0], err
    assert not (tmp_path / "m.gguf").exists()


def test_cli_export_gguf_prints_the_file_and_its_size(monkeypatch, capsys, tiny_adapter, tmp_path):
    monkeypatch.setattr("sys.argv", ["minitpo", "export", str(tiny_adapter), str(tmp_path / "m.gguf"), "--gguf"])
    cli_main()
    out = capsys.readouterr().out
    assert f"exported: {tmp_path / 'm.gguf'} (" in out and "MiB)" in out
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary file left behind


# ---------------------------------------------------------------------------------- tokenizer check

def test_check_tokenizer_refuses_a_gguf_that_splits_text_otherwise(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from minitpo.errors import UserError
    from minitpo.gguf_export import check_tokenizer

    path = tmp_path / "m.gguf"
    write_model_gguf(load(TINY / "policy"), tiny_tokenizer, path, "llama", "f32")
    check_tokenizer(path, tiny_tokenizer)
    other = AutoTokenizer.from_pretrained(TINY / "policy")
    other.add_tokens(["<think>"], special_tokens=True)  # one token for what the GGUF spells in pieces
    with pytest.raises(UserError, match="tokenizes a test text differently"):
        check_tokenizer(path, other)


def test_a_refused_export_writes_nothing(monkeypatch, capsys, tiny_adapter, tmp_path):
    import minitpo.gguf_export as ge

    write_tokenizer = ge._write_tokenizer

    def swapped(writer, tokenizer, n_vocab):  # a fault in the conversion: two tokens trade ids
        write_tokenizer(writer, tokenizer, n_vocab)
        tokens = writer.kv_data[0]["tokenizer.ggml.tokens"].value
        a = tokenizer(ge.PROBE, add_special_tokens=False).input_ids[0]
        tokens[a], tokens[a + 1] = tokens[a + 1], tokens[a]
    monkeypatch.setattr(ge, "_write_tokenizer", swapped)
    code, err = run_cli(monkeypatch, capsys, "export", tiny_adapter, tmp_path / "m.gguf", "--gguf")
    assert code == 2 and len(err) == 1 and "tokenizes a test text differently" in err[0], err
    assert list(tmp_path.iterdir()) == []
