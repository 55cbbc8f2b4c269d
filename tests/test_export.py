"""`minitpo chat` and `minitpo export` through the real CLI, on LoRA adapters made here from the tiny
policy: a bare adapter folder, and a fake iteration folder inside a run directory with its recipe.yaml.
Export is checked against peft itself: the merged model's logits equal the adapter model's."""

import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT, TINY
from minitpo.recipe import load_recipe, recipe_to_dict
from minitpo.errors import UserError
from minitpo.chat import Reply, format_reply
from minitpo.rundir import resolve_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def minitpo(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "minitpo", *map(str, args)], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=600)


def base_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(TINY / "policy"), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA adapter on every block linear with B != 0 (init_lora_weights=False), so it changes the model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False,
                      task_type="CAUSAL_LM")
    path = tmp_path_factory.mktemp("adapters") / "adapter"
    get_peft_model(base_model(), lora).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def iteration(adapter, tmp_path_factory):
    """RUN_DIR/iter-1 as `minitpo run` leaves it: the adapter, and the resolved recipe in RUN_DIR, here with
    the specific template so that we can tell the recipe was read."""
    run = tmp_path_factory.mktemp("runs") / "run"
    shutil.copytree(adapter, run / "iter-1" / "adapter")
    recipe = recipe_to_dict(load_recipe(ROOT / "recipes" / "tiny.yaml", ["thought.template=specific"], check_files=False))
    assert recipe["policy"]["model"] == str(TINY / "policy"), "the recipe must hold absolute paths, as a run writes it"
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return run / "iter-1"


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


# ---------------------------------------------------------------- resolving PATH

def test_resolve_an_iteration_reads_the_runs_recipe(iteration):
    r = resolve_adapter(iteration)
    assert r.adapter_dir == iteration / "adapter"
    assert r.template.name == "specific" and r.policy.quantization == "nf4" and r.sampling.max_new_tokens == 64
    assert resolve_adapter(iteration / "adapter").template.name == "specific"  # its adapter folder too
    assert resolve_adapter(iteration, template="direct").template.name == "direct"


def test_resolve_a_bare_adapter_reads_adapter_config(adapter):
    r = resolve_adapter(adapter)
    assert r.policy.model == str(TINY / "policy") and r.policy.quantization == "none"
    assert r.template.name == "generic" and r.adapter_dir == adapter


def test_resolve_errors_name_the_path_and_the_fix(iteration, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_adapter(tmp_path / "nope")
    with pytest.raises(UserError, match=r"is a run directory; give one of its iterations, e.g. .*iter-1"):
        resolve_adapter(iteration.parent)
    (tmp_path / "iter-3").mkdir()
    with pytest.raises(UserError, match="not finished training"):
        resolve_adapter(tmp_path / "iter-3")
    shutil.copytree(iteration / "adapter", tmp_path / "lonely" / "iter-1" / "adapter")
    with pytest.raises(UserError, match="recipe.yaml.*does not exist.*give the adapter folder"):
        resolve_adapter(tmp_path / "lonely" / "iter-1")


# ---------------------------------------------------------------- chat

def test_format_reply_shows_the_response_the_thought_on_request_and_raw_text_on_failure(adapter):
    from types import SimpleNamespace

    session = SimpleNamespace(template=resolve_adapter(adapter).template, sampling=SimpleNamespace(max_new_tokens=7))
    ok = Reply(text="Here is my thought process: hm Here is my response: Yes.", thought="hm", response="Yes.",
               parsed=True, truncated=False)
    assert format_reply(ok, session, show_thought=False) == "Yes."
    assert format_reply(ok, session, show_thought=True) == "[thought]\nhm\n\n[response]\nYes."
    broken = Reply(text="no marker", thought="", response="", parsed=False, truncated=False)
    assert format_reply(broken, session, False) == (
        "(note: the output does not split into thought and response at the marker 'Here is my response:'; "
        "showing the raw text)\nno marker")
    cut = Reply(text="Here is my", thought="", response="", parsed=False, truncated=True)
    assert format_reply(cut, session, True).splitlines()[0].startswith("(note: the output hit the 7-token limit")


def test_chat_hides_a_think_thought():
    from types import SimpleNamespace

    from minitpo.prompts import THINK, split_output

    session = SimpleNamespace(template=THINK, sampling=SimpleNamespace(max_new_tokens=7))
    text = "<think>\nThe user wants a color.\n</think>\n\nBlue."
    thought, response = split_output(text, THINK)
    r = Reply(text=text, thought=thought, response=response, parsed=True, truncated=False)
    assert format_reply(r, session, show_thought=False) == "Blue."
    assert format_reply(r, session, show_thought=True) == "[thought]\nThe user wants a color.\n\n[response]\nBlue."
    broken = Reply(text="<think>never closed", thought="", response="", parsed=False, truncated=False)
    assert "at the marker '</think>'" in format_reply(broken, session, False)


SHORT = ("--max-new-tokens", "48")  # a bare adapter samples with SamplingConfig's 1024-token budget


@pytest.fixture(scope="module")
def plain(adapter):
    result = minitpo("chat", adapter, "--prompt", "hi", *SHORT)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_chat_on_a_bare_adapter(adapter, plain):
    assert plain.strip()
    thought = minitpo("chat", adapter, "--prompt", "hi", "--show-thought", *SHORT)
    assert thought.returncode == 0, thought.stderr[-2000:]
    # A random adapter on the tiny policy does not write the marker: the same sample (same seed) is shown
    # raw both ways, with the note. The split display (--show-thought) is format_reply's test above.
    assert plain.startswith("(note: the output does not split into thought and response at the marker "
                            "'Here is my response:'; showing the raw text)\n")
    assert thought.stdout == plain


def test_chat_reads_messages_from_stdin_until_exit(adapter, plain):
    loop = minitpo("chat", adapter, *SHORT, stdin="hi\n\nexit\nnever answered\n")
    assert loop.returncode == 0, loop.stderr[-2000:]
    assert loop.stdout == plain + "\n"  # turn 0 samples with the same seed as --prompt; "exit" ends the loop
    eof = minitpo("chat", adapter, *SHORT, stdin="hi\n")
    assert eof.returncode == 0 and eof.stdout == loop.stdout


def test_chat_on_an_iteration_and_a_truncated_output(iteration):
    result = minitpo("chat", iteration, "--prompt", "Describe the red fox.", "--max-new-tokens", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("(note: the output hit the 1-token limit (--max-new-tokens) before it ended; "
                                    "showing the raw text)\n")  # the one token is not EOS: cut off


def test_chat_shorter_than_a_forced_runs_thought_budget(adapter, tmp_path):
    """A force_marker run's recipe.yaml holds its thought budget (tiny: half of 64 = 32); --max-new-tokens
    at or under it gives the thought half of the new limit, one above it keeps the run's budget."""
    from minitpo.chat import open_chat

    run = tmp_path / "run"
    shutil.copytree(adapter, run / "iter-1" / "adapter")
    recipe = recipe_to_dict(load_recipe(ROOT / "recipes" / "tiny.yaml", ["sampling.force_marker=true"], check_files=False))
    assert recipe["sampling"]["thought_tokens"] == 32
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert open_chat(run / "iter-1", max_new_tokens=32).sampling.thought_tokens == 16
    assert open_chat(run / "iter-1", max_new_tokens=33).sampling.thought_tokens == 32


def test_chat_user_error_is_one_line(iteration):
    result = minitpo("chat", iteration.parent, "--prompt", "hi")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "iter-1" in lines[0], result.stderr


# ---------------------------------------------------------------- export

def test_export_merges_the_adapter_into_a_plain_model(adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    result = minitpo("export", adapter, out)
    assert result.returncode == 0, result.stderr[-2000:]

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name in merged.state_dict())  # a plain transformers model
    assert merged.dtype == torch.float32  # the tiny base's own dtype
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("User query: Describe the red fox.")["input_ids"]

    with_adapter = PeftModel.from_pretrained(base_model(), adapter).eval()
    expected = logits(with_adapter, ids)
    assert torch.allclose(logits(merged, ids), expected, atol=1e-4), (logits(merged, ids) - expected).abs().max()
    assert (logits(base_model(), ids) - expected).abs().max() > 1e-2  # the adapter does change the model


def test_export_of_an_nf4_iteration_merges_in_full_precision(iteration, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    out.mkdir()  # an empty folder may be filled
    result = minitpo("export", iteration, out)
    assert result.returncode == 0, result.stderr[-2000:]
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = list(range(3, 40))
    expected = logits(PeftModel.from_pretrained(base_model(), iteration / "adapter").eval(), ids)
    assert torch.allclose(logits(merged, ids), expected, atol=1e-4)  # an NF4 merge would be off by far more


def test_export_refuses_a_non_empty_out(adapter, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = minitpo("export", adapter, out)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "not empty" in lines[0], result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
