"""`minitpo bench` through the real CLI, offline: a tiny run (recipes/tiny.yaml, one iteration) answers
tiny fixtures written here in each suite's own format; IFEval's real checkers score them, the tiny
GGUF judge and the rule judge compare them with the fixtures' baseline answers. Also: the cached
answers make a second bench sample nothing and a cut cache continue; `--responses` scores a file
without a model; user errors are one line; a training instruction that is a benchmark prompt warns."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, TINY, hf_cache_file
from minitpo import ifeval, io, suites

needs_bench = pytest.mark.skipif(ifeval.checkers_dir() is None, reason="the bench extra is not installed")

IFEVAL = [
    {"key": 11, "prompt": "Write a short story about a cold bird. Do not use any commas.",
     "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"key": 12, "prompt": "Tell a tale of the clock in at least 3 words, all in lowercase.",
     "instruction_id_list": ["length_constraints:number_words", "change_case:english_lowercase"],
     "kwargs": [{"relation": "at least", "num_words": 3}, {}]},
    {"key": 13, "prompt": "Explain the rain in fewer than 4 sentences.",
     "instruction_id_list": ["length_constraints:number_sentences"],
     "kwargs": [{"relation": "less than", "num_sentences": 4}]},
]
ALPACA = [{"dataset": "koala", "instruction": "Write a short story about a cold bird.",
           "output": "A sparrow shivered on a wire until the sun came out.", "generator": "gpt4_1106_preview"},
          {"dataset": "oasst", "instruction": "Explain why the sky is blue.",
           "output": "Air scatters blue light more than red light.", "generator": "gpt4_1106_preview"},
          {"dataset": "oasst", "instruction": "Tell a tale of the clock.",
           "output": "The clock struck thirteen and everyone laughed.", "generator": "gpt4_1106_preview"}]


def minitpo(*args, env=None):
    return subprocess.run([sys.executable, "-m", "minitpo", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    d = tmp_path_factory.mktemp("suites")
    io.write_jsonl(d / "ifeval.jsonl", IFEVAL)
    io.write_json(d / "alpaca.json", ALPACA)
    arena = d / "arena-hard-v2.0"
    io.write_jsonl(arena / "question.jsonl", [
        {"uid": "u1", "category": "hard_prompt", "subcategory": "math", "prompt": "What is 2 + 2?"},
        {"uid": "u2", "category": "creative_writing", "subcategory": "creative_writing", "prompt": "A poem on rain."}])
    for model, uid, answer in (("o3-mini-2025-01-31", "u1", "4"), ("gemini-2.0-flash-001", "u2", "Rain falls.")):
        io.write_jsonl(arena / "model_answer" / f"{model}.jsonl", [
            {"uid": uid, "messages": [{"role": "user", "content": "q"},
                                      {"role": "assistant", "content": {"answer": answer}}]}])
    return d


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """recipes/tiny.yaml for one iteration, with every instruction trained on (no held-out set): 15 of
    the tiny instructions and, where a suite is installed, one IFEval prompt, which must warn."""
    d = tmp_path_factory.mktemp("bench_run")
    rows = io.read_jsonl(TINY / "instructions.jsonl")[:15]
    shipped = suites.load_suite("ifeval")[0]["prompt"] if ifeval.checkers_dir() else "Write a poem about the sea."
    io.write_jsonl(d / "instructions.jsonl", rows + [{"instruction": shipped}])
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    recipe["policy"]["model"] = str(TINY / "policy")
    recipe["judge"]["model"] = str(TINY / "judge.gguf")
    recipe["data"] = {"instructions": str(d / "instructions.jsonl"), "per_iteration": 16, "held_out": 0}
    recipe["iterations"] = 1
    recipe["sampling"]["k"] = 2  # the cheapest run that trains an adapter: bench only needs one
    recipe["train"].update(epochs=1, val_fraction=0.0)
    (d / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    result = minitpo("run", d / "tiny.yaml", "--out", d / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    return d / "run", result


@needs_bench
def test_a_run_that_trains_on_a_benchmark_prompt_warns(tiny_run):
    _, result = tiny_run
    warning = [line for line in result.stderr.splitlines() if "benchmark prompts" in line]
    assert warning == ["warning: 1 training instructions are benchmark prompts (ifeval 1); `minitpo bench` on "
                       "those suites would score training data: remove them from data.instructions"]


@needs_bench
def test_ifeval_bench_scores_each_models_cached_answers(tiny_run, fixtures, tmp_path):
    run, _ = tiny_run
    out = tmp_path / "ifeval.json"
    result = minitpo("bench", run, "--suite", "ifeval", "--data", fixtures / "ifeval.jsonl",
                     "--model", "seed", "--model", "iter-1", "--json", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| seed | 3 |" in result.stdout and "| iter-1 | 3 |" in result.stdout
    saved = json.loads(out.read_text())
    assert set(saved["models"]) == {"seed", "iter-1"} and saved["n"] == 3
    for label in ("seed", "iter-1"):
        answers = io.read_jsonl(run / "bench" / "ifeval" / f"{label}.answers.jsonl")
        assert [a["key"] for a in answers] == [11, 12, 13]
        assert all(a["response"] == "" for a in answers if not a["parsed"])  # a format failure shows nothing
        # the same responses scored without a model (--responses) give the same numbers
        io.write_jsonl(tmp_path / f"{label}.jsonl", [{"key": a["key"], "response": a["response"]} for a in answers])
        scored = minitpo("bench", "--suite", "ifeval", "--data", fixtures / "ifeval.jsonl",
                         "--responses", tmp_path / f"{label}.jsonl", "--json", tmp_path / f"{label}.scored.json")
        assert scored.returncode == 0, scored.stderr[-2000:]
        by_file = json.loads((tmp_path / f"{label}.scored.json").read_text())
        by_run = saved["models"][label]
        for key in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"):
            assert by_run[key] == by_file["summary"][key]
        assert by_file["rows"] == io.read_jsonl(run / "bench" / "ifeval" / f"{label}.ifeval.jsonl")
    # report shows the table
    assert minitpo("report", run).returncode == 0
    report = (run / "report.md").read_text()
    assert "## Benchmark: ifeval" in report and "| iter-1 | 3 |" in report


@needs_bench
def test_responses_json_has_the_issues_format(fixtures, tmp_path):
    # hand-worked: 11 has no comma (follows); 12 has 4 words but a capital T (strict fails lowercase; loose too:
    # no line or asterisk to drop); 13 is one sentence (follows)
    io.write_jsonl(tmp_path / "r.jsonl", [{"key": 11, "response": "A bird froze."},
                                          {"prompt": IFEVAL[1]["prompt"], "response": "Tick tock went time."},
                                          {"key": 13, "response": "Water falls from clouds."}])
    result = minitpo("bench", "--suite", "ifeval", "--data", fixtures / "ifeval.jsonl", "--responses",
                     tmp_path / "r.jsonl", "--json", tmp_path / "o.json")
    assert result.returncode == 0, result.stderr
    out = json.loads((tmp_path / "o.json").read_text())
    assert set(out) == {"summary", "rows"}
    assert [(r["key"], r["strict"], r["loose"]) for r in out["rows"]] == [(11, True, True), (12, False, False),
                                                                           (13, True, True)]
    assert out["rows"][1]["instructions"] == [{"id": "length_constraints:number_words", "strict": True, "loose": True},
                                              {"id": "change_case:english_lowercase", "strict": False, "loose": False}]
    assert out["summary"]["prompt_strict"] == pytest.approx(2 / 3)
    assert out["summary"]["instruction_strict"] == pytest.approx(3 / 4)


def test_alpaca_eval_bench_judges_against_the_baseline_and_resumes(tiny_run, fixtures):
    run, _ = tiny_run
    args = ("bench", run, "--suite", "alpaca_eval", "--data", fixtures / "alpaca.json", "--model", "iter-1")
    result = minitpo(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = run / "bench" / "alpaca_eval"
    answers = io.read_jsonl(folder / "iter-1.answers.jsonl")
    outputs = json.loads((folder / "iter-1.model_outputs.json").read_text())
    assert outputs == [{"instruction": a["instruction"], "output": b["response"], "generator": "iter-1"}
                       for a, b in zip(ALPACA, answers)]
    [judged] = folder.glob("iter-1.judged-*.jsonl")
    assert {r["key"] for r in io.read_jsonl(judged)} == {a["key"] for a in answers if a["parsed"]}
    saved = json.loads((run / "bench" / "alpaca_eval.json").read_text())["models"]["iter-1"]
    assert saved["n"] == 3 and set(saved["categories"]) == {"koala", "oasst"}
    assert saved["judge"]["type"] == "llama_cpp"
    # the win rate is the mean verdict of the cached p's (a format failure loses), independently recomputed
    p = {r["key"]: r["p"] for r in io.read_jsonl(judged)}
    verdicts = [0.0 if k not in p else 1.0 if p[k] > 0.5 else 0.5 if p[k] == 0.5 else 0.0 for k in range(3)]
    assert saved["win_rate"] == pytest.approx(sum(verdicts) / 3)

    # all cached: a second bench samples nothing (the answers file is not rewritten)
    stamp = (folder / "iter-1.answers.jsonl").stat().st_mtime_ns
    assert minitpo(*args).returncode == 0
    assert (folder / "iter-1.answers.jsonl").stat().st_mtime_ns == stamp
    # a bench killed after one answer continues: the rest is sampled again, from the same seeds
    io.write_jsonl(folder / "iter-1.answers.jsonl", answers[:1])
    judged.unlink()
    assert minitpo(*args).returncode == 0
    assert io.read_jsonl(folder / "iter-1.answers.jsonl") == answers
    again = json.loads((run / "bench" / "alpaca_eval.json").read_text())["models"]["iter-1"]
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in saved.items() if k != "seconds"}


def test_arena_hard_with_a_judge_override(tiny_run, fixtures):
    run, _ = tiny_run
    result = minitpo("bench", run, "judge.type=python", "judge.function=minitpo.verifiable:score",
                     "--suite", "arena_hard", "--data", fixtures / "arena-hard-v2.0", "--model", "seed")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((run / "bench" / "arena_hard.json").read_text())["models"]["seed"]
    assert saved["judge"]["type"] == "python" and saved["n"] == 2
    assert set(saved["categories"]) == {"math", "creative_writing"}  # one prompt each, a format failure included
    assert "| seed | 2 |" in result.stdout and "python minitpo.verifiable:score" in result.stdout


def test_user_errors_are_one_line_before_any_model_loads(tiny_run, fixtures, tmp_path):
    run, _ = tiny_run
    cases = [
        (("bench", "--suite", "ifeval"), "give RUN_DIR"),
        (("bench", run, "--suite", "alpaca_eval", "sampling.k=2"), "is not a judge.* override"),
        (("bench", run, "--suite", "ifeval", "--model", "iter-7"), "'iter-7' has no trained adapter"),
        (("bench", run, "--suite", "ifeval", "--data", tmp_path / "none.jsonl"), "does not exist"),
        (("bench", "--suite", "alpaca_eval", "--responses", tmp_path / "r.jsonl"), "--responses scores IFEval"),
        (("bench", run, "--suite", "alpaca_eval", "judge.model=/no/such.gguf"), "judge.model: '/no/such.gguf'"),
    ]
    for args, message in cases:
        result = minitpo(*args)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, result.stderr[-2000:])


def test_a_hub_judge_override_comes_from_the_hugging_face_cache(tmp_path, monkeypatch):
    """bench judge.model=ORG/REPO/FILE.gguf: the cached file (the real tiny judge, offline), or one line."""
    from huggingface_hub import constants

    from minitpo.bench import _judge
    from minitpo.errors import UserError
    from minitpo.recipe import load_recipe, recipe_to_dict

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cached = hf_cache_file(tmp_path / "hub", "someone/big-judge-GGUF", "big.gguf", TINY / "judge.gguf")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(load_recipe(ROOT / "recipes" / "tiny.yaml"))))
    assert _judge(tmp_path, ["judge.model=someone/big-judge-GGUF/big.gguf"]).model == str(cached)
    with pytest.raises(UserError, match=r"^judge.model: 'someone/none-GGUF/big.gguf' is not in the local Hugging Face "
                                        "cache and HF_HUB_OFFLINE is set; download it once with `hf download"):
        _judge(tmp_path, ["judge.model=someone/none-GGUF/big.gguf"])


def test_a_missing_suite_says_how_to_get_it(tmp_path):
    """Without the wheel (python -S: no site-packages) and without a Hub cache: one line naming the fixes."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from minitpo import suites\n"
            "try:\n    suites.locate('ifeval')\nexcept Exception as e:\n    print(type(e).__name__, e)")
    result = subprocess.run([sys.executable, "-S", "-c", code, str(ROOT)], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == (
        "UserError --suite ifeval: its data is not here; pip install 'minitpo[bench]' (bundles it), or "
        "`huggingface-cli download --repo-type dataset google/IFEval` with a network, or --data FILE")


def test_a_copy_in_the_hugging_face_cache_comes_first(tmp_path):
    """The layout `huggingface-cli download --repo-type dataset google/IFEval` leaves in HF_HUB_CACHE."""
    snapshot = tmp_path / "hub" / "datasets--google--IFEval" / "snapshots" / "abc123"
    io.write_jsonl(snapshot / "ifeval_input_data.jsonl", IFEVAL[:1])
    (tmp_path / "hub" / "datasets--google--IFEval" / "refs").mkdir()
    (tmp_path / "hub" / "datasets--google--IFEval" / "refs" / "main").write_text("abc123")
    code = "from minitpo import suites; print(suites.locate('ifeval')); print(len(suites.load_suite('ifeval')))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert result.stdout.split() == [str(snapshot / "ifeval_input_data.jsonl"), "1"], result.stderr[-2000:]


def test_the_overlap_check_reads_each_suite_once_and_catches_a_benchmark_prompt(tmp_path):
    """AlpacaEval found in the Hugging Face cache: a training instruction equal to one of its prompts up to
    surrounding whitespace is caught, the others are not; a second check in the same process (every run
    start after the first) reads no suite file again: it still catches the prompt with the file gone."""
    snapshot = tmp_path / "hub" / "datasets--tatsu-lab--alpaca_eval" / "snapshots" / "abc123"
    io.write_json(snapshot / "alpaca_eval_gpt4_baseline.json", ALPACA)
    (tmp_path / "hub" / "datasets--tatsu-lab--alpaca_eval" / "refs").mkdir()
    (tmp_path / "hub" / "datasets--tatsu-lab--alpaca_eval" / "refs" / "main").write_text("abc123")
    code = ("import json, os, sys; from minitpo import suites\n"
            "texts = ['  Tell a tale of the clock.\\n', 'Tell a tale of the clocks.', 'Explain why the sky is green.']\n"
            "print(json.dumps(suites.benchmark_overlap(texts)))\n"
            "os.remove(suites.locate('alpaca_eval'))\n"
            "print(json.dumps(suites.benchmark_overlap(texts)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert [json.loads(line) for line in result.stdout.splitlines()] == [{"alpaca_eval": 1}, {"alpaca_eval": 1}]
    assert not (snapshot / "alpaca_eval_gpt4_baseline.json").exists()  # the second check had nothing to read


@needs_bench
def test_bench_warns_when_a_model_trained_on_the_suites_prompts(tiny_run, tmp_path):
    run, _ = tiny_run
    trained = suites.load_suite("ifeval")[0]  # the tiny run trained on this prompt
    io.write_jsonl(tmp_path / "ifeval.jsonl", [trained])
    result = minitpo("bench", run, "--suite", "ifeval", "--data", tmp_path / "ifeval.jsonl", "--model", "seed",
                     "--model", "iter-1")
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: iter-1 was trained on 1 of these ifeval prompts; its score on them is not a "
                        "held-out benchmark"]  # the seed was trained on nothing


def test_limit_subsets_are_nested_and_spread_over_the_suite():
    from minitpo.bench import subset

    prompts = [{"key": i, "category": "ab"[i >= 50]} for i in range(100)]  # sorted by category, as AlpacaEval is
    ten, twenty = subset(prompts, 10), subset(prompts, 20)
    assert twenty[:10] == ten and len({p["key"] for p in twenty}) == 20  # a prefix: cached answers carry over
    assert {p["category"] for p in ten} == {"a", "b"}  # not the file's first ten
    assert subset(prompts, None) == prompts and subset(prompts, 500) == prompts
