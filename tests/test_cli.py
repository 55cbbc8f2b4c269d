"""The whole loop through the real CLI on the tiny recipe, resume, and user errors (exit 2, one line)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

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


def test_the_console_shows_minitpo_lines_only(tiny_run):
    """No third-party noise: bitsandbytes' optional-kernel message (printed on CPUs with AVX-512 bf16),
    peft's FutureWarning, transformers' weight-loading bars. minitpo's own bars and lines remain."""
    _, result = tiny_run
    for noise in ("kernels-community", "FutureWarning", "Loading weights", "warnings.warn"):
        assert noise not in result.stderr, noise
    assert "sample:" in result.stderr and "train:" in result.stderr
    assert all(line.startswith(("iter ", "iterations done")) for line in result.stdout.splitlines()), result.stdout


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
    assert all(s["response_length"] > 0 for s in scores)
    # each pair is its instruction's best length-controlled score against the worst, or a parse failure
    final = {}
    for s in scores:
        final.setdefault(s["instruction_id"], {})[s["index"]] = s["final"]
    for p in pairs:
        ours = final[p["instruction_id"]]
        assert ours[p["chosen_index"]] == p["chosen_score"] == max(ours.values()), p
        if p["rejected_parsed"]:
            assert ours[p["rejected_index"]] == p["rejected_score"] == min(ours.values()), p
        else:
            assert p["rejected_index"] not in ours and p["rejected_score"] is None, p
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


def test_recipe_yaml_records_the_resolved_defaults_and_stages_json_the_slots(tiny_run):
    """tiny.yaml leaves train.gradient_checkpointing unset with an nf4 policy: on. It samples 16
    instructions x 4 candidates = 64 prompts with batch_size 64, so the fast engine builds 64 slots,
    once (no forcing: one pass)."""
    import yaml

    out, _ = tiny_run
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["policy"]["quantization"] == "nf4" and recipe["train"]["gradient_checkpointing"] is True
    for t in (1, 2):
        assert json.load(open(out / f"iter-{t}" / "stages.json"))["sampling_slots"] == [64]


def test_a_run_written_by_an_older_minitpo_resumes(tiny_run, tmp_path):
    """An older recipe.yaml: without a key added since (judge.min_verdict_mass) and with a default then
    left unresolved (gradient_checkpointing: null). Iteration 2 lost its training (as after a kill):
    the run resumes, trains it again and keeps every finished stage, and recipe.yaml gains the values
    the run uses."""
    import yaml

    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    old = yaml.safe_load((out / "recipe.yaml").read_text())
    del old["judge"]["min_verdict_mass"]
    old["train"]["gradient_checkpointing"] = None
    (out / "recipe.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    it2 = out / "iter-2"
    for name in ("summary.json", "train_summary.json", "train_log.jsonl"):
        (it2 / name).unlink()
    shutil.rmtree(it2 / "adapter")
    kept = [p for t in (1, 2) for p in (out / f"iter-{t}").iterdir() if p.name != "stages.json"]
    kept += [out / "iter-1" / "stages.json"]
    stamps = {p: os.stat(p).st_mtime_ns for p in kept}

    result = minitpo("run", "recipes/tiny.yaml", "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {p: os.stat(p).st_mtime_ns for p in kept} == stamps  # nothing finished was redone
    assert "train" in result.stderr and "sample" not in result.stderr and "changed" not in result.stderr
    assert (it2 / "summary.json").exists() and (it2 / "adapter" / "adapter_config.json").exists()
    now = yaml.safe_load((out / "recipe.yaml").read_text())
    assert now["judge"]["min_verdict_mass"] == 0.0 and now["train"]["gradient_checkpointing"] is True


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
    # n_ctx 460 holds the pairwise prompt (436 tokens) and a short pair of responses (its prompts are
    # 453-470 tokens), not the longer pairs: those are cut to fit and counted, and the run goes on
    result = minitpo("run", "recipes/tiny.yaml", "--out", out, "iterations=1", "judge.mode=pairwise", "judge.rho=auto",
                     "judge.n_ctx=460")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.load(open(out / "iter-1" / "summary.json"))
    assert summary["judge_prompts_cut"] > 0
    assert summary["pairs"] > 0
    cands = jsonl(out / "iter-1" / "candidates.jsonl")
    verdict = {(r["instruction"], r["first"], r["second"]): r["verdict"] for r in jsonl(out / "iter-1" / "judge_cache.jsonl")}
    # position consistency by hand from the cached verdicts: over every unordered pair of an instruction's
    # parsed responses, the same one wins in both orders (or both orders tie exactly)
    agree = []
    for iid in dict.fromkeys(c["instruction_id"] for c in cands):
        group = [c for c in cands if c["instruction_id"] == iid and c["parsed"]]
        for m, a in enumerate(group):
            for b in group[m + 1:]:
                ab, ba = verdict[(a["instruction"], a["response"], b["response"])], verdict[(a["instruction"], b["response"], a["response"])]
                agree.append((ab > 0.5 and ba < 0.5) or (ab < 0.5 and ba > 0.5) or ab == ba == 0.5)
    assert summary["position_consistency"] == pytest.approx(sum(agree) / len(agree))
    # rho auto: with the rho chosen, chosen responses are on average no longer than rejected ones (over
    # pairs whose rejected side parsed), and with the grid's previous value (0.05 less) they still are longer
    length = {(c["instruction_id"], c["index"]): len(c["response"]) for c in cands}

    def longer(pairs):
        kept = [p for p in pairs if p["rejected_parsed"]]
        return bool(kept) and (sum(length[(p["instruction_id"], p["chosen_index"])] for p in kept)
                               > sum(length[(p["instruction_id"], p["rejected_index"])] for p in kept))
    assert not longer(jsonl(out / "iter-1" / "pairs.jsonl"))
    if summary["rho"] > 0:
        from dataclasses import asdict

        from minitpo.pairs import build_pairs, control_length
        from minitpo.sample import Candidate

        objs = [Candidate(**c) for c in cands]
        raw = {(s["instruction_id"], s["index"]): s["score"] for s in jsonl(out / "iter-1" / "scores.jsonl")}
        lower = build_pairs(objs, raw, control_length(objs, raw, round(summary["rho"] - 0.05, 2)))
        assert longer([asdict(p) for p in lower])
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


# ------------------------------------------------------------------ faults mid-run: SIGKILL, Ctrl-C, a second writer

# (file to wait for, seconds after it appears): the moments a run is killed, spread over every stage of
# both iterations and the evaluation. Each relaunch resumes the run and is killed at the next moment.
KILL_POINTS = [
    (None, 1.0),                                # starting up: imports, before the run directory
    ("recipe.yaml", 0.3),                       # loading the policy
    ("held_out.jsonl", 2.0),                    # iteration 1: sampling
    ("iter-1/candidates.jsonl", 0.2),           # judging
    ("iter-1/scores.jsonl", 0.3),               # reference log-probs
    ("iter-1/pairs.jsonl", 0.8),                # training
    ("iter-1/pairs.jsonl", 1.8),                # training, later
    ("iter-1/summary.json", 0.5),               # iteration 2: loading the adapter, sampling
    ("iter-2/candidates.jsonl", 0.5),           # judging
    ("iter-2/pairs.jsonl", 1.0),                # training
    ("iter-2/summary.json", 0.5),               # evaluation: sampling the two models
    ("iter-2/summary.json", 4.0),               # evaluation, later
]

# A stage's output files, by the file that marks it finished (written last).
STAGE_FILES = {"candidates.jsonl": ["candidates.jsonl"],
               "scores.jsonl": ["scores.jsonl", "judge_stats.json", "judge_cache.jsonl"],
               "pairs.jsonl": ["pairs.jsonl"],
               "train_summary.json": ["train_summary.json", "train_log.jsonl", "adapter"],
               "summary.json": ["summary.json"]}


def _finished_outputs(out):
    """{path: (inode, mtime_ns)} of every file of a finished stage: none of them may be written again."""
    paths = [out / "held_out.jsonl", out / "recipe.yaml", out / "judge_prompt.txt", *out.glob("eval/*")]
    for it in out.glob("iter-*"):
        for marker, names in STAGE_FILES.items():
            if (it / marker).exists():
                for name in names:
                    p = it / name
                    paths += sorted(p.rglob("*")) if p.is_dir() else [p]
    return {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in paths if p.is_file()}


def _launch(out, *extra):
    return subprocess.Popen([sys.executable, "-m", "minitpo", "run", "recipes/tiny.yaml", "--out", str(out),
                             "evaluate=true", *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(path, proc, timeout_s=300):
    start = time.monotonic()
    while not (path is None or path.exists()):
        if proc.poll() is not None or time.monotonic() - start > timeout_s:
            return False
        time.sleep(0.02)
    return True


def test_sigkill_at_many_moments_then_resume_loses_only_the_stage_in_flight(tiny_run, tmp_path):
    out = tmp_path / "run"
    kills = resumed_finished = 0
    for n, (name, delay) in enumerate(KILL_POINTS):
        before = _finished_outputs(out) if out.exists() else {}
        proc = _launch(out)
        if _wait_for(out / name if name else None, proc):
            time.sleep(delay)
        if n == 2:
            # A second writer while this one samples: refused in one line, with --fresh too, nothing touched.
            assert proc.poll() is None, "the run ended before the second writer could try"
            for extra in ((), ("--fresh",)):
                second = minitpo("run", "recipes/tiny.yaml", "--out", out, "evaluate=true", *extra)
                lines = second.stderr.strip().splitlines()
                assert second.returncode == 2 and len(lines) == 1, second.stderr[-2000:]
                assert f"is in use by another minitpo run (pid {proc.pid})" in lines[0]
                assert (out / "recipe.yaml").exists() and (out / "held_out.jsonl").exists()
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=60)
        after = _finished_outputs(out) if out.exists() else {}
        changed = [str(p.relative_to(out)) for p, stamp in before.items() if after.get(p) != stamp]
        assert not changed, f"kill {n}: finished outputs written again: {changed}"
        resumed_finished += len(before)
    assert kills >= 10, f"only {kills} of the launches were still running when killed"

    # Ctrl-C: one line, exit 130; then a last run finishes what is left.
    proc = _launch(out)
    time.sleep(3.0)
    assert proc.poll() is None, "the run ended before Ctrl-C"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted; run the same command again to resume"), err[-2000:]
    before = _finished_outputs(out)
    final = minitpo("run", "recipes/tiny.yaml", "--out", out, "evaluate=true")
    assert final.returncode == 0, final.stderr[-3000:]
    assert all(_finished_outputs(out).get(p) == s for p, s in before.items())
    assert "win rate" in final.stdout and "n 8: too few items for an interval" in final.stdout  # 8 < 10
    assert "warning: evaluate: data.held_out 8 gives a win rate whose 95% interval is about +-0.35 wide" in final.stderr

    # Every file present and valid, no temporary file left, and the same candidates, scores and pairs as
    # the uninterrupted run (every candidate has its own seed, the judge is deterministic).
    assert not list(out.rglob("*.tmp"))
    for t in (1, 2):
        for name in FILES + ["scores.jsonl", "judge_stats.json", "stages.json", "train_summary.json"]:
            assert (out / f"iter-{t}" / name).exists(), f"iter-{t}/{name}"
        for name in ("candidates.jsonl", "scores.jsonl", "pairs.jsonl"):
            assert jsonl(out / f"iter-{t}" / name) == jsonl(tiny_run[0] / f"iter-{t}" / name), f"iter-{t}/{name}"
        stages = json.load(open(out / f"iter-{t}" / "stages.json"))
        assert set(stages) == {"sample", "judge", "pair", "train", "world_size", "sampling_slots",
                               "predicted_peak_gib", "peak_rss_gib", "start_rss_gib"}
        assert stages["sampling_slots"] == [64]  # recorded before the sample stage's file: no kill loses it
    for p in out.rglob("*.json"):
        json.load(open(p))
    for p in out.rglob("*.jsonl"):
        jsonl(p)
    assert len(jsonl(out / "metrics.jsonl")) == 2
    assert json.load(open(out / "eval" / "iter-2-vs-seed.json"))["n"] == 8
    print(f"{kills} kills, {resumed_finished} finished files checked unchanged across resumes")


def test_ctrl_c_exits_130_even_after_passing_through_pyrun_string(tmp_path):
    # CPython 3.11 under `python -m` kills itself with SIGINT at shutdown (status -2) when a
    # KeyboardInterrupt ever passed through code C ran with PyRun_String, even one minitpo caught.
    # The command here raises Ctrl-C that way; minitpo must still print one line and exit 130.
    (tmp_path / "ctrl_c_in_c.py").write_text(
        "import ctypes\n"
        "from minitpo import cli\n"
        "def press_ctrl_c(*args, **kwargs):\n"
        "    run = ctypes.pythonapi.PyRun_String\n"
        "    run.restype, run.argtypes = ctypes.py_object, [ctypes.c_char_p, ctypes.c_int, ctypes.py_object,"
        " ctypes.py_object]\n"
        "    run(b'raise KeyboardInterrupt', 257, {}, {})\n"
        "cli.cli.main = press_ctrl_c\n"
        "cli.main()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "ctrl_c_in_c"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "interrupted; run the same command again to resume from the last finished stage"]


# ------------------------------------------------------------------ held-out stays held out (issue 26)

QUICK = ["sampling.k=2", "sampling.max_new_tokens=32", "train.epochs=1", "train.val_fraction=0",
         "judge.type=python", "judge.function=minitpo.verifiable:score"]


def test_held_out_instructions_are_never_sampled_with_repeats_and_a_file_that_grew(tmp_path):
    """Every instruction listed twice, then lines appended between resumes (one a held-out instruction
    in other case and spacing): no held-out text ever reaches an iteration's candidates, no text is
    used by two iterations, and the split the run started with is kept."""
    lines = (TINY / "instructions.jsonl").read_text().splitlines()
    data = tmp_path / "instructions.jsonl"
    data.write_text("\n".join(lines + lines) + "\n")  # each instruction twice
    out = tmp_path / "run"
    first = minitpo("run", "recipes/tiny.yaml", "--out", out, f"data.instructions={data}", "iterations=1", *QUICK)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "48 repeated instructions dropped" in first.stderr
    held_before = (out / "held_out.jsonl").read_text()
    held = [json.loads(line)["text"] for line in held_before.splitlines()]
    assert len(held) == 8 == len({" ".join(h.lower().split()) for h in held})

    grown = [json.dumps({"instruction": f"Name {n} things that are blue."}) for n in range(2, 12)]
    grown.append(json.dumps({"instruction": "  " + held[0].upper() + " "}))  # a held-out one, again
    data.write_text(data.read_text() + "\n".join(grown) + "\n")
    second = minitpo("run", "recipes/tiny.yaml", "--out", out, f"data.instructions={data}", "iterations=2", *QUICK)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (out / "held_out.jsonl").read_text() == held_before

    norm = lambda text: " ".join(text.lower().split())  # noqa: E731
    used = [{norm(c["instruction"]) for c in jsonl(out / f"iter-{t}" / "candidates.jsonl")} for t in (1, 2)]
    assert len(used[0]) == len(used[1]) == 16
    assert not used[0] & used[1]
    assert not {norm(h) for h in held} & (used[0] | used[1])
    split = json.load(open(out / "split.json"))["iterations"]
    assert [{norm(i["text"]) for i in s} for s in split] == used


def test_a_run_that_trains_on_nothing_says_so_and_the_report_shows_it(tmp_path):
    out = tmp_path / "run"
    result = minitpo("run", "recipes/tiny.yaml", "--out", out, "iterations=1", *QUICK, "train.max_length=16")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.load(open(out / "iter-1" / "summary.json"))
    pairs = jsonl(out / "iter-1" / "pairs.jsonl")
    assert pairs and all(p["skipped"] for p in pairs)  # every pair longer than 16 tokens
    message = f"all {len(pairs)} pairs are longer than train.max_length and were skipped, so nothing was trained"
    assert summary["warnings"][0].startswith(message) and summary["updates"] == 0
    assert f"warning: iter 1: {message}" in result.stderr
    shown = minitpo("report", out)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert f"- iter 1: {message}" in (out / "report.md").read_text()


def test_a_setting_fixed_after_a_crash_is_taken_and_the_finished_stages_kept(tmp_path):
    """Training died (its outputs are gone, as after a crash): a changed train setting is taken on the
    rerun and only training runs again; a changed judge setting is refused, the judge stage having run."""
    out = tmp_path / "run"
    first = minitpo("run", "recipes/tiny.yaml", "--out", out, "iterations=1", *QUICK)
    assert first.returncode == 0, first.stderr[-3000:]
    it = out / "iter-1"
    for name in ("summary.json", "train_summary.json", "train_log.jsonl"):
        (it / name).unlink()
    shutil.rmtree(it / "adapter")
    stamps = {name: os.stat(it / name).st_mtime_ns for name in ("candidates.jsonl", "scores.jsonl", "pairs.jsonl")}

    refused = minitpo("run", "recipes/tiny.yaml", "--out", out, "iterations=1", *QUICK, "judge.rho=0.1")
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-2000:]
    assert "holds a run of a different recipe (judge.rho differs, and iter-1 ran its judge stage with the old value)" in lines[0]

    fixed = minitpo("run", "recipes/tiny.yaml", "--out", out, "iterations=1", *QUICK, "train.lr=1e-4")
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "recipe: train.lr changed; no iteration has run the stage that reads it" in fixed.stderr
    assert {name: os.stat(it / name).st_mtime_ns for name in stamps} == stamps
    assert (it / "summary.json").exists() and "lr: 0.0001" in (out / "recipe.yaml").read_text()
