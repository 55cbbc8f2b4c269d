"""`minitpo eval`: the win-rate and bootstrap arithmetic on hand-made verdicts, per-category
aggregation, user errors, and the whole command through the real CLI on a tiny run (real sampling,
real llama.cpp judge), followed by `minitpo report` picking the result up."""

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import ROOT
from test_stats import plain_bootstrap
from minitpo.errors import UserError
from minitpo.evaluate import aggregate, evaluate, length_controlled, win_rate_summary
from minitpo.judges import compare
from minitpo.stats import verdict


def minitpo(*args):
    return subprocess.run([sys.executable, "-m", "minitpo", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def hand_verdict(p):
    """A win, a tie or a loss, by hand: p above, at or below one half."""
    return 1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0


# ---------------------------------------------------------------- arithmetic

def test_verdicts_count_ties_as_half():
    assert [verdict(p) for p in (0.9, 0.51, 0.5, 0.49, 0.0, 1.0)] == [1.0, 1.0, 0.5, 0.0, 0.0, 1.0]
    # 2 wins, 1 tie, 1 loss: (1 + 1 + 0.5 + 0) / 4
    s = win_rate_summary([0.8, 0.6, 0.5, 0.1])
    assert s["n"] == 4 and s["win_rate"] == pytest.approx(0.625)
    assert s["mean_p"] == pytest.approx((0.8 + 0.6 + 0.5 + 0.1) / 4)


@pytest.mark.parametrize("ps, flagged", [([0.9], True), ([0.9, 0.1] * 4 + [0.9], True), ([0.9, 0.1] * 5, False)])
def test_an_interval_over_too_few_items_says_so(ps, flagged):
    """An interval over fewer than 10 items is flagged, by n, on the overall rate and on each category's."""
    from minitpo.evaluate import ci_text, summary_text

    s = win_rate_summary(ps)
    r = {"model": "iter-1", "against": "seed", **s, "ties": 0, "parse_rate": {"iter-1": 1.0, "seed": 1.0},
         "response_chars": {"iter-1": 10, "seed": 10}, "categories": {"poem": {**s}}}
    text = summary_text(r)
    note = f"n {len(ps)}: too few items for an interval"
    assert ci_text(s).endswith(note) == flagged
    assert text.count(note) == (2 if flagged else 0)  # the overall line and the category's
    poem = next(line for line in text.splitlines() if line.startswith("  poem: "))
    assert poem.endswith(f"{note})" if flagged else ", n 10")


def test_one_win_is_a_point_interval_and_flagged():
    """One win gives "1.000 (95% CI 1.000-1.000)": an interval that means nothing, so it says so."""
    from minitpo.evaluate import ci_text, summary_text

    s = win_rate_summary([0.9])
    assert ci_text(s) == "95% CI 1.000-1.000, n 1: too few items for an interval"
    r = {"model": "iter-1", "against": "seed", **s, "ties": 0, "parse_rate": {"iter-1": 1.0, "seed": 1.0},
         "response_chars": {"iter-1": 10, "seed": 10}, "categories": {"poem": {**s}}}
    assert summary_text(r).splitlines()[0] == ("iter-1 vs seed: win rate 1.000 (95% CI 1.000-1.000, n 1: too few "
                                               "items for an interval) over 1 instructions, mean p 0.900, ties 0")
    assert "  poem: 1.000 (1.000-1.000, n 1: too few items for an interval)" in summary_text(r)


def test_evaluate_with_few_held_out_instructions_warns_with_the_interval_width():
    from minitpo.evaluate import held_out_warning

    assert held_out_warning(8).startswith("evaluate: data.held_out 8 gives a win rate whose 95% interval is about "
                                          "+-0.35 wide")  # 1.96 x 0.5 / sqrt(8) = 0.346
    assert held_out_warning(32) is None


def test_all_wins_and_all_losses_collapse_the_interval():
    wins = win_rate_summary([0.7] * 10)
    assert (wins["win_rate"], wins["ci_low"], wins["ci_high"]) == (1.0, 1.0, 1.0)
    losses = win_rate_summary([0.2] * 10)
    assert (losses["win_rate"], losses["ci_low"], losses["ci_high"]) == (0.0, 0.0, 0.0)


def row(i, category, p, model_parsed=True, against_parsed=True, model_response="abcd", against_response="ab"):
    return {"instruction_id": i, "instruction": f"q{i}", "category": category, "p": p,
            "model_response": model_response if model_parsed else "", "model_parsed": model_parsed,
            "against_response": against_response if against_parsed else "", "against_parsed": against_parsed,
            "judged": model_parsed and against_parsed}


def test_aggregate_splits_by_category_and_reports_both_models():
    rows = [row(0, "story", 0.9), row(1, "story", 0.5), row(2, "story", 1.0, against_parsed=False),
            row(3, "explain", 0.2), row(4, "explain", 0.0, model_parsed=False), row(5, "", 0.7)]
    r = aggregate(rows, "iter-2", "seed")
    assert r["model"] == "iter-2" and r["against"] == "seed" and r["n"] == 6
    assert r["win_rate"] == pytest.approx((1 + 0.5 + 1 + 0 + 0 + 1) / 6)
    assert r["ties"] == 1 and r["judged"] == 4
    assert r["parse_rate"] == {"iter-2": pytest.approx(5 / 6), "seed": pytest.approx(5 / 6)}
    assert r["response_chars"] == {"iter-2": 4.0, "seed": 2.0}  # over parsed responses only
    cats = r["categories"]
    assert set(cats) == {"story", "explain", "uncategorized"}
    assert cats["story"]["n"] == 3 and cats["story"]["win_rate"] == pytest.approx(2.5 / 3)
    assert cats["explain"]["win_rate"] == 0.0 and cats["explain"]["ci_high"] == 0.0
    assert cats["uncategorized"] == {"n": 1, "win_rate": 1.0, "ci_low": 1.0, "ci_high": 1.0, "mean_p": 0.7,
                                     "length_controlled": None}  # one instruction: nothing to regress
    # the interval resamples the category's own verdicts: story's 1, 0.5 and 1 (the failure of "seed" loses)
    assert (cats["story"]["ci_low"], cats["story"]["ci_high"]) == pytest.approx(plain_bootstrap([1.0, 0.5, 1.0]))


# ---------------------------------------------------------------- user errors (no model loads)

def test_user_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        evaluate(tmp_path / "nope")
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(UserError, match="holds no recipe.yaml"):
        evaluate(run)


# ---------------------------------------------------------------- the real CLI on a tiny run

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = minitpo("run", "recipes/tiny.yaml", "--out", out, "iterations=1")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def evaluated(tiny_run):
    result = minitpo("eval", tiny_run)
    assert result.returncode == 0, result.stderr[-3000:]
    return tiny_run, result


def test_eval_writes_a_win_rate_with_its_interval(evaluated):
    """Every number of the result, recomputed here from the rows it was made from."""
    run, result = evaluated
    r = json.loads((run / "eval" / "iter-1-vs-seed.json").read_text())
    rows = [json.loads(line) for line in open(run / "eval" / "iter-1-vs-seed.jsonl")]
    assert (r["model"], r["against"], r["n"], len(rows)) == ("iter-1", "seed", 8, 8)
    verdicts = [hand_verdict(x["p"]) for x in rows]
    assert r["win_rate"] == pytest.approx(np.mean(verdicts)) and r["mean_p"] == pytest.approx(np.mean([x["p"] for x in rows]))
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(plain_bootstrap(verdicts))
    assert r["parse_rate"] == {"iter-1": pytest.approx(np.mean([x["model_parsed"] for x in rows])),
                               "seed": pytest.approx(np.mean([x["against_parsed"] for x in rows]))}
    assert r["ties"] == sum(x["p"] == 0.5 for x in rows) and r["judged"] == sum(x["judged"] for x in rows)
    by_category = {}
    for x in rows:
        by_category.setdefault(x["category"] or "uncategorized", []).append(hand_verdict(x["p"]))
    assert {c: (v["n"], v["win_rate"]) for c, v in r["categories"].items()} == {
        c: (len(v), pytest.approx(np.mean(v))) for c, v in by_category.items()}
    assert f"iter-1 vs seed: win rate {np.mean(verdicts):.3f}" in result.stdout


def test_eval_rows_hide_thoughts_and_failures_lose(evaluated):
    """Each row's p, by hand: a format failure loses to a parsed response and two failures tie, without
    the judge; so do two identical responses; the judge decides every other row, with a p of its own."""
    run, _ = evaluated
    rows = [json.loads(line) for line in open(run / "eval" / "iter-1-vs-seed.jsonl")]
    held = {json.loads(line)["id"] for line in open(run / "held_out.jsonl")}
    assert len(rows) == 8 and {r["instruction_id"] for r in rows} == held
    for r in rows:
        assert "Here is my response:" not in r["model_response"] + r["against_response"]
        assert r["model_parsed"] or r["model_response"] == ""
        assert r["against_parsed"] or r["against_response"] == ""
        if not (r["model_parsed"] and r["against_parsed"]):
            expected = 0.5 if r["model_parsed"] == r["against_parsed"] else float(r["model_parsed"])
            assert (r["judged"], r["p"]) == (False, expected)
        elif r["model_response"] == r["against_response"]:
            assert (r["judged"], r["p"]) == (False, 0.5)
        else:  # the GGUF judge's two-order average: a probability strictly inside (0, 1), never exactly a tie
            assert r["judged"] and 0 < r["p"] < 1 and r["p"] != 0.5


def test_report_plots_the_eval(evaluated):
    run, _ = evaluated
    result = minitpo("report", run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "report" / "win_rate.png").is_file()
    # the held-out marker rate of the eval joins iteration 1's row of the table
    rows = [json.loads(line) for line in open(run / "eval" / "iter-1-vs-seed.jsonl")]
    row = next(line for line in (run / "report.md").read_text().splitlines() if line.startswith("| 1 "))
    assert row.split("|")[5] == f" {np.mean([x['model_marker'] for x in rows]):.2f} "  # recounted from the rows


def test_eval_user_errors_through_the_cli(tiny_run):
    for args, words in [(["--model", "iter-7"], "iter-7"), (["--against", "best"], "is neither seed, iter-N"),
                        (["--model", "iter-1", "--against", "iter-1"], "two different models")]:
        result = minitpo("eval", tiny_run, *args)
        assert result.returncode == 2, result.stderr
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert "Traceback" not in result.stderr


def test_eval_refuses_a_run_without_held_out_instructions(tiny_run, tmp_path):
    recipe = yaml.safe_load((tiny_run / "recipe.yaml").read_text())
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (empty / "held_out.jsonl").write_text("")
    with pytest.raises(UserError, match="no held-out instructions; set data.held_out"):
        evaluate(empty)


def test_eval_with_a_pointwise_judge_lets_the_higher_score_win(tiny_run, tmp_path):
    """A python judge scores each response; the longer one wins here, equal lengths tie."""
    import shutil

    run = tmp_path / "pointwise"
    shutil.copytree(tiny_run, run)
    (tmp_path / "len_judge.py").write_text("def score(instruction, response):\n    return len(response)\n")
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["judge"].update(type="python", function=f"{tmp_path / 'len_judge.py'}:score", model=None)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = evaluate(run)
    rows = [json.loads(line) for line in open(run / "eval" / "iter-1-vs-seed.jsonl")]
    assert len(rows) == 8
    for r in rows:  # every row's p by hand: the format rule, else the length judge
        a, b = len(r["model_response"]), len(r["against_response"])
        if not (r["model_parsed"] and r["against_parsed"]):
            expected = 0.5 if r["model_parsed"] == r["against_parsed"] else float(r["model_parsed"])
        else:
            expected = 1.0 if a > b else 0.5 if a == b else 0.0
        assert r["p"] == expected, r
    assert result["win_rate"] == pytest.approx(np.mean([hand_verdict(r["p"]) for r in rows]))


def test_judge_pairs_with_a_pointwise_judge_by_hand(tmp_path):
    """judges.compare with a python judge: p from the two scores, higher wins, a tie is 0.5."""
    from minitpo.config import JudgeConfig

    (tmp_path / "len_judge.py").write_text("def score(instruction, response):\n    return len(response)\n")
    cfg = JudgeConfig(type="python", function=f"{tmp_path / 'len_judge.py'}:score")
    ps = compare(cfg, ["q1", "q2", "q3"], ["long answer", "ab", "same"], ["short", "abcd", "four"])
    assert ps == [1.0, 0.0, 0.5]


# ---------------------------------------------------------------- length control and other runs

def _synthetic_rows(n, decide, seed=0):
    """Rows whose model responses run ~60 characters longer on average; `decide(diff, rng)` -> p."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        a, b = int(rng.integers(50, 400)) + 60, int(rng.integers(50, 400))
        rows.append({"instruction_id": len(rows), "model_parsed": True, "against_parsed": True, "model_response": "x" * a,
                     "against_response": "x" * b, "p": decide(a - b, rng)})
    return rows


def test_length_controlled_rate_goes_to_half_when_length_alone_decides():
    # the judge prefers the longer response, with noise: P(win) = sigmoid(diff / 50), nothing else counts
    rows = _synthetic_rows(400, lambda d, rng: float(rng.random() < 1 / (1 + np.exp(-d / 50))))
    raw = np.mean([r["p"] for r in rows])
    lc = length_controlled(rows)
    assert raw > 0.6 and lc["ci_low"] < 0.5 < lc["ci_high"] and abs(lc["win_rate"] - 0.5) < 0.05, (raw, lc)


def test_length_controlled_rate_stays_when_quality_alone_decides():
    rows = _synthetic_rows(400, lambda d, rng: float(rng.random() < 0.7))  # wins 70%, whatever the lengths
    raw = np.mean([r["p"] for r in rows])
    lc = length_controlled(rows)
    assert abs(lc["win_rate"] - raw) < 0.03 and lc["ci_low"] > 0.6, (raw, lc)
    failed = [{**r, "against_parsed": False} for r in rows[:1]]
    assert length_controlled(failed) is None  # no pair of parsed responses: nothing to regress


def test_samples_of_one_instruction_count_as_one_instruction():
    # by hand: instructions a (win, loss), b (win, win), c (loss, loss) -> 0.5, 1, 0 -> 0.5 over 3
    s = win_rate_summary([0.9, 0.1, 0.8, 0.7, 0.2, 0.0], ["a", "a", "b", "b", "c", "c"])
    assert s["n"] == 3 and s["win_rate"] == pytest.approx(0.5)
    # Two identical samples per instruction are no more evidence than one: the interval is the one
    # sample's, where a bootstrap over samples would narrow it by about 1/sqrt(2).
    ps = [1.0] * 12 + [0.0] * 8
    one = win_rate_summary(ps, list(range(20)))
    two = win_rate_summary(ps + ps, list(range(20)) * 2)
    assert (two["win_rate"], two["ci_low"], two["ci_high"]) == (one["win_rate"], one["ci_low"], one["ci_high"])
    flat = win_rate_summary(ps + ps)  # no groups: 40 independent verdicts
    assert flat["ci_high"] - flat["ci_low"] < 0.85 * (one["ci_high"] - one["ci_low"])
    rows = _synthetic_rows(60, lambda d, rng: float(rng.random() < 0.6))
    lc_one, lc_two = length_controlled(rows), length_controlled(rows + rows)
    assert lc_two["n"] == lc_one["n"] == 60
    assert lc_two["win_rate"] == pytest.approx(lc_one["win_rate"], abs=0.01)
    width = lc_one["ci_high"] - lc_one["ci_low"]
    assert lc_two["ci_high"] - lc_two["ci_low"] == pytest.approx(width, rel=0.1)


def test_eval_draws_several_samples_per_instruction(tiny_run):
    result = minitpo("eval", tiny_run, "--samples", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads((tiny_run / "eval" / "iter-1-vs-seed.json").read_text())
    rows = [json.loads(line) for line in open(tiny_run / "eval" / "iter-1-vs-seed.jsonl")]
    assert (r["n"], r["samples"], len(rows)) == (8, 2, 16)
    assert sorted((x["instruction_id"], x["sample"]) for x in rows) == sorted(
        (i, j) for i in {x["instruction_id"] for x in rows} for j in (0, 1))
    # the tiny template's marker is "Here is my response:", which the tiny model writes itself
    for who in ("iter-1", "seed"):
        side = "model" if who == "iter-1" else "against"
        assert r["marker_rate"][who] == pytest.approx(np.mean([x[f"{side}_marker"] for x in rows]))
        assert r["thought_rate"][who] <= r["marker_rate"][who]
    assert "x 2 samples" in result.stdout and "marker written by the model" in result.stdout


def test_eval_against_another_runs_iteration(tiny_run, tmp_path):
    """The same model in a copy of the run: every response identical, so every instruction ties."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    result = minitpo("eval", tiny_run, "--against", other / "iter-1")
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads((tiny_run / "eval" / "iter-1-vs-other-iter-1.json").read_text())
    assert r["against"] == "other-iter-1" and r["win_rate"] == 0.5 and r["judged"] == 0 and r["ties"] == r["n"]

    held = other / "held_out.jsonl"
    held.write_text(held.read_text().splitlines()[0] + "\n")
    refused = minitpo("eval", tiny_run, "--against", other / "iter-1")
    assert refused.returncode == 2 and "other held-out instructions" in refused.stderr, refused.stderr
