"""minitpo plan: each stage's predicted peak against numbers worked by hand from Qwen2.5-1.5B's config,
against the peaks a real tiny run measured (iter-N/stages.json), and the command's output and errors."""

import json

import pytest

from minitpo.plan import plan_recipe
from minitpo.recipe import load_recipe
from test_cli import minitpo

GIB = 2**30
# Qwen/Qwen2.5-1.5B-Instruct's config.json: hidden, MLP, layers, heads, K/V heads, head width, vocabulary
H, I, L, HEADS, KV, HD, V = 1536, 8960, 28, 12, 2, 128, 151936


def qwen_by_hand():
    """Parameter counts of Qwen2.5-1.5B from its config alone: q/k/v carry biases, embeddings are tied."""
    linear_per_layer = H * H + 2 * H * (KV * HD) + (HEADS * HD) * H + 3 * H * I  # q, k, v, o, gate, up, down
    bias_norms_per_layer = H + 2 * KV * HD + 2 * H
    params = L * (linear_per_layer + bias_norms_per_layer) + V * H + H  # + embedding (tied) + final norm
    r = 16  # LoRA rank of recipes/qwen1.5b.yaml, on all seven projections
    lora = L * r * ((H + H) + 2 * (H + KV * HD) + (HEADS * HD + H) + 2 * (H + I) + (I + H))
    return params, L * linear_per_layer, lora


def test_qwen_parameters_and_weights_by_hand():
    params, linear, lora = qwen_by_hand()
    assert params == 1_543_714_304  # the "1.54B" of the model card
    plan = plan_recipe(load_recipe("recipes/qwen1.5b.yaml", check_files=False), 12, "cuda", prompt_tokens=128)
    assert plan["policy"]["params"] == params and plan["policy"]["lora_params"] == lora
    # NF4 with double quantization: 4 bits a weight, one 8-bit absmax per 64 weights, one float32 per 256 of
    # those; embeddings, norms and biases stay bf16
    nf4 = linear * (4 / 8 + 1 / 64 + 4 / (64 * 256)) + (params - linear) * 2
    assert plan["policy"]["weights_gb"] == round(nf4 / GIB, 3) == 1.064


def test_qwen_sample_stage_by_hand():
    """The slots batch_size auto takes on a 12 GiB card: 128-token prompts + 1,024 new = 1,152 columns."""
    params, linear, lora = qwen_by_hand()
    plan = plan_recipe(load_recipe("recipes/qwen1.5b.yaml", check_files=False), 12, "cuda", prompt_tokens=128)
    per_slot = 2 * L * KV * HD * 1152 * 2 + 32 * V  # K and V in bf16 + fp32 logits, sort and cumsum workspace
    assert per_slot == 37_892_096  # RESULTS.md's "37.9 MB a slot"
    resident = linear * (0.5 + 1 / 64 + 4 / 16384) + (params - linear) * 2 + lora * 4  # LoRA in float32
    copy = params * 2  # the bf16 sampling copy, LoRA merged
    free = 12 * GIB - GIB / 2 - resident - 2 * GIB  # less the CUDA context and the engine's 2 GiB reserve
    slots = min(256, int((free - copy) // per_slot))
    assert slots == 155
    sample = plan["stages"]["sample"]
    assert sample["parts"]["kv_cache"] == round(slots * per_slot / GIB, 3)
    assert sample["parts"]["copy"] == round(copy / GIB, 3) == 2.875
    prefill = 8192 * (2 * (3 * H + 2 * HEADS * HD + 2 * KV * HD + 3 * I) + 4 * H)  # one 8,192-token layer
    assert sample["peak_gb"] == round((resident + copy + slots * per_slot + prefill) / GIB, 3)
    assert sample["peak_gb"] * GIB <= 11.5 * GIB  # auto leaves the reserve: it fits by construction


def test_qwen_judge_and_train_by_hand():
    params, linear, lora = qwen_by_hand()
    plan = plan_recipe(load_recipe("recipes/qwen1.5b.yaml", check_files=False), 12, "cuda", prompt_tokens=128)
    judge = plan["stages"]["judge"]["parts"]  # Qwen2.5-7B Q4_K_M: 28 layers, 4 K/V heads of 128, 28 heads
    assert judge["gguf"] == round(4.68e9 / GIB, 3) == 4.359
    assert judge["kv"] == round(4096 * 28 * 2 * 4 * 128 * 2 / GIB, 3) == 0.219  # f16 K and V over n_ctx 4096
    assert judge["scores"] == round(512 * 4096 * 28 * 4 / GIB, 3)  # one 512-token batch's float32 scores
    train = plan["stages"]["train"]["parts"]
    assert train["lora_grad_adam"] == round(lora * 4 * 3 / GIB, 3)  # gradient + two Adam moments, float32
    rows, row = 2 * 4, 128 + 1024 + 8  # train.batch_size 4 pairs; prompt + max_new_tokens + marker < 1536
    tokens = rows * row
    # one 1,024-row chunk of the LM head: bf16 logits, float32 log-probs, bf16 gradient (logps.py: 10 bytes)
    assert train["log_probs"] == round((3 * tokens * H * 2 + 1024 * V * 10) / GIB, 3)
    # checkpointing (NF4): every layer's bf16 input, and one layer's saved tensors (LoRA dropout 0.05 on)
    saved = tokens * (8 * H + 2 * (2 * H + 2 * HEADS * HD + 2 * KV * HD + 4 * I)
                      + 3 * (H + H + H + HEADS * HD + H + H + I))
    assert train["activations"] == round((L * tokens * H * 2 + saved) / GIB, 3)
    assert plan["fits"] is True and plan["lower"] is None


def test_a_card_too_small_names_the_stage_and_its_setting():
    recipe = load_recipe("recipes/qwen1.5b.yaml", check_files=False)
    plan = plan_recipe(recipe, 6, "cuda", prompt_tokens=128)  # 6 GiB less the CUDA context: 5.5 for the stages
    assert plan["fits"] is False
    assert [k for k, v in plan["stages"].items() if v["peak_gb"] > 5.5] == ["judge"]  # 4.36 GiB of GGUF + policy
    assert plan["largest"] == "judge" and plan["lower"].startswith("judge.n_ctx")
    # the judge on the CPU (n_gpu_layers 0) leaves the policy alone on the card; 16 pairs a step do not fit
    recipe = load_recipe("recipes/qwen1.5b.yaml", ["judge.n_gpu_layers=0", "train.batch_size=16"], check_files=False)
    plan = plan_recipe(recipe, 6, "cuda", prompt_tokens=128)
    assert plan["stages"]["judge"]["peak_gb"] == plan["stages"]["judge"]["parts"]["policy"]
    assert plan["largest"] == "train" and plan["lower"].startswith("train.batch_size")


@pytest.fixture(scope="module")
def tiny_sample_run(tmp_path_factory):
    """The tiny recipe with 256 candidates of up to 400 new tokens an iteration: a 128 MiB KV cache
    (256 slots x 512 columns x 1 KiB), well above what the process's allocator adds or keeps."""
    out = tmp_path_factory.mktemp("runs") / "tiny-plan"
    result = minitpo("run", "recipes/tiny.yaml", "--out", out, "sampling.k=16", "sampling.batch_size=256",
                     "sampling.max_new_tokens=400")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_run_prints_the_plan_and_records_predicted_beside_measured(tiny_sample_run):
    out, result = tiny_sample_run
    assert result.stderr.lstrip().startswith("plan: tiny-plan on the CPU")
    for t in (1, 2):
        stages = json.loads((out / f"iter-{t}" / "stages.json").read_text())
        assert set(stages["predicted_peak_gib"]) == set(stages["peak_rss_gib"]) == {"sample", "judge", "pair", "train"}
    # Iteration 2's sample stage starts with the policy loaded and its libraries imported; what it adds to
    # the process's resident memory (peak less start, the heap trimmed first) is the engine's copy, KV
    # cache, workspace and prefill: the predicted peak less the resident policy (2 MiB here).
    predicted = stages["predicted_peak_gib"]["sample"]
    added = stages["peak_rss_gib"]["sample"] - stages["start_rss_gib"]["sample"]
    assert predicted > 0.125, predicted  # the KV cache alone is 0.125 GiB
    # Tolerance 10%: the prediction counts tensors; the process also holds allocator slack, Python objects
    # and the per-call buffers (token lists, the uniform draws) that the plan leaves out.
    assert abs(added - predicted) <= 0.1 * predicted, (predicted, added)


def test_plan_command_writes_json_and_names_the_setting(tmp_path):
    path = tmp_path / "plan.json"
    result = minitpo("plan", "recipes/qwen1.5b.yaml", "--gpu-memory", "6", "--json", path)
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads(path.read_text())
    assert plan["fits"] is False and plan["gpu_memory_gb"] == 6
    assert set(plan["stages"]) == {"sample", "judge", "reference", "train"}
    assert all(isinstance(v["peak_gb"], float) for v in plan["stages"].values())
    assert "fits: no: train needs" in result.stdout and "lower train.batch_size" in result.stdout
    assert "(estimate)" in result.stdout


@pytest.mark.parametrize("args, names", [
    (["--gpu-memory", "0"], "--gpu-memory"),
    (["train.batch_size=0"], "train.batch_size"),
    (["--json", "."], "--json"),
])
def test_plan_user_errors_are_one_line(args, names):
    result = minitpo("plan", "recipes/qwen1.5b.yaml", *args)
    assert result.returncode == 2 and names in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
