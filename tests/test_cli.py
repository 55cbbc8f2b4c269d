"""The whole loop through the real CLI on the tiny recipe, resume, and user errors (exit 2, one line)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, TINY

FILES = ["candidates.jsonl", "scores.jsonl", "pairs.jsonl", "adapter/adapter_config.json",
         "adapter/adapter_model.safetensors", "train_log.jsonl", "summary.json"]


def minitpo(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "minitpo", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=900)


def jsonl(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = minitpo("run", "recipes/tiny.yaml", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_tiny_run_writes_every_file_for_both_iterations(tiny_run):
    out, result = tiny_run
    for t in (1, 2):
        for name in FILES:
            assert (out / f"iter-{t}" / name).exists(), f"iter-{t}/{name}"
    assert len(jsonl(out / "metrics.jsonl")) == 2
    assert (out / "recipe.yaml").exists()
    assert result.stdout.count("iter ") >= 2  # one summary line per iteration


def test_iteration_one_has_a_realistic_mix(tiny_run):
    out, _ = tiny_run
    cands = jsonl(out / "iter-1" / "candidates.jsonl")
    assert set(cands[0]) >= {"instruction_id", "instruction", "prompt", "index", "text", "thought",
                             "response", "parsed", "n_tokens", "truncated"}
    parse_rate = sum(c["parsed"] for c in cands) / len(cands)
    assert 0 < parse_rate < 1
    summary = json.load(open(out / "iter-1" / "summary.json"))
    assert summary["pairs"] >= summary["instructions"] / 2
    for c in cands:  # the split never leaks the marker into the response
        assert "Here is my response:" not in c["response"]
        assert not c["parsed"] or c["response"]


def test_instructions_are_fresh_and_held_out_never_trained(tiny_run):
    out, _ = tiny_run
    ids = [{c["instruction_id"] for c in jsonl(out / f"iter-{t}" / "candidates.jsonl")} for t in (1, 2)]
    held = {r["id"] for r in jsonl(out / "held_out.jsonl")}
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    assert not held & (ids[0] | ids[1])


def test_pairs_carry_reference_logps_and_scores(tiny_run):
    out, _ = tiny_run
    pairs = jsonl(out / "iter-1" / "pairs.jsonl")
    assert pairs and all(p["ref_chosen_logps"] < 0 and p["ref_rejected_logps"] < 0 for p in pairs if not p["skipped"])
    scores = jsonl(out / "iter-1" / "scores.jsonl")
    assert all(1 <= s["score"] <= 9 and s["response_length"] > 0 for s in scores)
    assert 0 < json.load(open(out / "iter-1" / "summary.json"))["judge_verdict_mass"] < 1  # a random judge
    log = jsonl(out / "iter-1" / "train_log.jsonl")
    assert log and {"loss", "chosen_reward", "rejected_reward", "reward_accuracy", "margin", "lr", "tokens_per_s"} <= set(log[0])


def test_adapter_loads_with_peft_and_differs_between_iterations(tiny_run):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, _ = tiny_run
    base = AutoModelForCausalLM.from_pretrained(TINY / "policy")
    PeftModel.from_pretrained(base, out / "iter-2" / "adapter")
    a1 = load_file(out / "iter-1" / "adapter" / "adapter_model.safetensors")
    a2 = load_file(out / "iter-2" / "adapter" / "adapter_model.safetensors")
    assert any(not (a1[k] == a2[k]).all() for k in a1)


def test_resume_skips_finished_stages_and_redoes_a_killed_one(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    stamp = {p: os.stat(p).st_mtime_ns for p in out.rglob("*.jsonl")}
    again = minitpo("run", "recipes/tiny.yaml", "--out", out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert {p: os.stat(p).st_mtime_ns for p in out.rglob("*.jsonl")} == stamp  # nothing recomputed
    assert "sample" not in again.stderr

    # Kill iteration 2 during training: its training outputs are missing, earlier stages stay.
    it2 = out / "iter-2"
    for name in ("summary.json", "train_summary.json", "train_log.jsonl"):
        (it2 / name).unlink()
    shutil.rmtree(it2 / "adapter")
    candidates_before = (it2 / "candidates.jsonl").read_bytes()
    redo = minitpo("run", "recipes/tiny.yaml", "--out", out)
    assert redo.returncode == 0, redo.stderr[-2000:]
    assert (it2 / "candidates.jsonl").read_bytes() == candidates_before
    assert os.stat(it2 / "pairs.jsonl").st_mtime_ns == stamp[it2 / "pairs.jsonl"]
    assert (it2 / "summary.json").exists() and (it2 / "adapter" / "adapter_config.json").exists()
    assert "train" in redo.stderr and "sample" not in redo.stderr


def test_help_for_every_command():
    result = minitpo("--help")
    assert result.returncode == 0 and "think" in result.stdout
    for command in ("run", "eval", "report", "chat", "export"):
        sub = minitpo(command, "--help")
        assert sub.returncode == 0 and "Usage" in sub.stdout, sub.stderr


def _tiny_recipe_with(tmp_path, replace):
    text = (ROOT / "recipes" / "tiny.yaml").read_text()
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    text = text.replace(": tiny/", f": {TINY}/")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("replace, message", [
    ({"  k: 4": "  k: 4\n  kay: 2"}, "sampling.kay: unknown recipe key"),
    ({"  k: 4": "  k: four"}, "sampling.k: 'four' has the wrong type"),
    ({"model: tiny/policy": "model: ./no/such/policy"}, "policy.model:"),
    ({"model: tiny/judge.gguf": "model: /no/such/judge.gguf"}, "judge.model: '/no/such/judge.gguf' does not exist"),
    ({"instructions: tiny/instructions.jsonl": "instructions: EMPTY"}, "holds no instructions"),
    ({"  k: 4": "  k: [4"}, "is not valid YAML"),
    ({"model: tiny/judge.gguf": "model: NOTGGUF"}, "is not a GGUF file"),
])
def test_user_errors_are_one_line_with_exit_status_2(tmp_path, replace, message):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "not.gguf").write_bytes(b"\x00" * 64)
    replace = {k: v.replace("EMPTY", str(tmp_path / "empty.jsonl")).replace("NOTGGUF", str(tmp_path / "not.gguf"))
               for k, v in replace.items()}
    out = tmp_path / "out"
    result = minitpo("run", _tiny_recipe_with(tmp_path, replace), "--out", out)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not out.exists()  # failed before writing anything


def test_pairwise_judge_and_auto_rho_through_the_loop(tmp_path):
    out = tmp_path / "pairwise"
    result = minitpo("run", "recipes/tiny.yaml", "--out", out, "iterations=1", "judge.mode=pairwise", "judge.rho=auto")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.load(open(out / "iter-1" / "summary.json"))
    assert 0 <= summary["position_consistency"] <= 1
    assert summary["rho"] in [i / 20 for i in range(11)]
    assert summary["pairs"] > 0
    scores = jsonl(out / "iter-1" / "scores.jsonl")
    by_instruction = {}
    for s in scores:
        by_instruction.setdefault(s["instruction_id"], []).append(s["score"])
    for group in by_instruction.values():  # Bradley-Terry scores are centred within each instruction
        assert abs(sum(group)) < 1e-6
    # Every ordered pair of different positions was judged once (identical texts share one verdict).
    parsed = [c for c in jsonl(out / "iter-1" / "candidates.jsonl") if c["parsed"]]
    expected = {(a["instruction"], a["response"], b["response"]) for a in parsed for b in parsed
                if a["instruction_id"] == b["instruction_id"] and a["index"] != b["index"]}
    cached = {(r["instruction"], r["first"], r["second"]) for r in jsonl(out / "iter-1" / "judge_cache.jsonl")}
    assert cached == expected
