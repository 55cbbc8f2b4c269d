"""minitpo/judges/check.py and `minitpo judge-check`: the sanity set, the arithmetic against
hand-computed verdicts, every judge type (python, GGUF pointwise and pairwise on the tiny judge), the
--json file, the user's own --set, and `judge.check` in a run."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, TINY, hf_cache_file
from minitpo.config import JudgeConfig
from minitpo.stats import bootstrap_interval
from minitpo.judges.check import (KINDS, REFUSALS, at_chance, check_judge, headline, load_preference_set, sanity_items,
                                  summary_text)
from minitpo.errors import UserError

LENGTH_JUDGE = "def score(instruction, response):\n    return len(response)\n"


def minitpo(*args):
    return subprocess.run([sys.executable, "-m", "minitpo", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_sanity_set_has_64_items_of_each_kind_built_as_documented():
    rows = [json.loads(line) for line in (ROOT / "minitpo" / "judges" / "sanity.jsonl").read_text().splitlines()]
    items = sanity_items()
    assert len(rows) >= 60 and len(items) == 4 * len(rows)
    by_kind = {k: [it for it in items if it.kind == k] for k in KINDS}
    assert all(len(v) == len(rows) for v in by_kind.values())
    goods = {r["good"]: r for r in rows}
    for it in by_kind["off_topic"]:  # another row's answer, of another category
        assert it.rejected in goods and goods[it.rejected]["category"] != goods[it.chosen]["category"]
    for it in by_kind["truncated"]:  # a prefix of the good answer that stops mid-sentence
        assert it.chosen.startswith(it.rejected) and len(it.rejected) < 0.7 * len(it.chosen)
        assert not it.rejected.endswith((".", "!", "?"))
    assert {it.rejected for it in by_kind["refusal"]} == set(REFUSALS)
    assert all(it.rejected != it.chosen for it in items)


def test_accuracy_per_kind_equals_hand_counted_verdicts(tmp_path):
    """A python judge that scores length: every verdict is known from the texts alone."""
    (tmp_path / "length_judge.py").write_text(LENGTH_JUDGE)
    cfg = JudgeConfig(type="python", function=f"{tmp_path / 'length_judge.py'}:score")
    items = sanity_items()
    result = check_judge(cfg, items, progress=False)
    for kind in KINDS:
        verdicts = [1.0 if len(it.chosen) > len(it.rejected) else 0.5 if len(it.chosen) == len(it.rejected) else 0.0
                    for it in items if it.kind == kind]
        r = result["kinds"][kind]
        assert r["n"] == len(verdicts) and r["accuracy"] == pytest.approx(sum(verdicts) / len(verdicts))
        assert (r["ci_low"], r["ci_high"]) == pytest.approx(bootstrap_interval(verdicts))
    assert result["kinds"]["truncated"]["accuracy"] == 1.0 and result["kinds"]["refusal"]["accuracy"] == 1.0
    assert result["n"] == len(items) and result["verdict_mass"] is None and result["responses_per_s"] > 0


def test_user_set_in_trl_format_and_json_through_the_cli(tmp_path):
    rows = [{"prompt": "Capital of France?", "chosen": "Paris is the capital.", "rejected": "No."},
            {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "It is 4."}],
             "rejected": [{"role": "assistant", "content": "It is four hundred and twelve."}], "kind": "math"}]
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "length_judge.py").write_text(LENGTH_JUDGE)
    recipe = tmp_path / "r.yaml"
    recipe.write_text((ROOT / "recipes" / "tiny.yaml").read_text().replace(": tiny/", f": {TINY}/"))
    result = minitpo("judge-check", recipe, "judge.type=python", f"judge.function={tmp_path / 'length_judge.py'}:score",
                     "--set", tmp_path / "set.jsonl", "--json", tmp_path / "out.json")
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.load(open(tmp_path / "out.json"))
    assert {"n", "accuracy", "ci_low", "ci_high", "kinds"} <= set(saved)
    assert saved["n"] == 2 and saved["accuracy"] == 0.5  # the longer wins: right once, wrong once
    assert saved["kinds"]["all"]["accuracy"] == 1.0 and saved["kinds"]["math"]["accuracy"] == 0.0
    assert "warning: the judge cannot be told from chance" in result.stdout  # 2 items cannot show more
    assert "judge-check: chosen preferred 0.500 (95% CI 0.000-1.000, n 2: too few items for an interval)" in result.stdout
    assert "  math: 0.000 (0.000-0.000, n 1: too few items for an interval)" in result.stdout


def test_hub_gguf_judge_from_the_hugging_face_cache_offline(tmp_path):
    """judge.model ORG/REPO/FILE.gguf through the real CLI, with HF_HUB_OFFLINE=1: found in the cache the
    real tiny judge was put into, it judges as the same file given by its path does; not cached, one line
    and exit status 2, before any model loads."""
    import os

    rows = [{"prompt": "Capital of France?", "chosen": "Paris is the capital.", "rejected": "No."},
            {"prompt": "2+2?", "chosen": "It is 4.", "rejected": "It is four hundred and twelve."}]
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    hf_cache_file(tmp_path / "hub", "someone/tiny-judge-GGUF", "judge.gguf", TINY / "judge.gguf")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}

    def check(model, name):
        return subprocess.run([sys.executable, "-m", "minitpo", "judge-check", "recipes/tiny.yaml", f"judge.model={model}",
                               "--set", tmp_path / "set.jsonl", "--json", tmp_path / name], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)

    hub = check("someone/tiny-judge-GGUF/judge.gguf", "hub.json")
    assert hub.returncode == 0, hub.stderr[-2000:]
    local = check(TINY / "judge.gguf", "local.json")
    assert local.returncode == 0, local.stderr[-2000:]
    a, b = (json.load(open(tmp_path / name)) for name in ("hub.json", "local.json"))
    assert (a["accuracy"], a["verdict_mass"], a["kinds"]) == (b["accuracy"], b["verdict_mass"], b["kinds"])

    missing = check("someone/no-judge-GGUF/judge.gguf", "missing.json")
    assert missing.returncode == 2 and missing.stderr.strip() == (
        "error: judge.model: 'someone/no-judge-GGUF/judge.gguf' is not in the local Hugging Face cache and "
        "HF_HUB_OFFLINE is set; download it once with `hf download someone/no-judge-GGUF judge.gguf`, or give "
        "the path of a local .gguf file")


def test_bad_user_set_names_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a"}\n')
    with pytest.raises(UserError, match="bad.jsonl line 2 is not a JSON object with prompt, chosen and rejected"):
        load_preference_set(tmp_path / "bad.jsonl")


def test_at_chance_and_the_warnings_on_hand_made_results():
    """The interval reaching 0.5 is "at chance"; a pairwise judge that keeps its winner across the two
    orders less than half the time judges by position. Both are warned about, each on its own."""
    def result(accuracy, ci_low, ci_high, consistency=None):
        r = {"n": 40, "accuracy": accuracy, "ci_low": ci_low, "ci_high": ci_high, "responses_per_s": 1.0,
             "kinds": {}}
        return r if consistency is None else {**r, "position_consistency": consistency}

    assert at_chance(result(0.55, 0.45, 0.65)) and at_chance(result(0.6, 0.5, 0.7))
    assert not at_chance(result(0.8, 0.51, 0.9))
    chance = "warning: the judge cannot be told from chance (accuracy 0.55, 95% CI reaches 0.45)"
    position = "warning: the pairwise judge picks the same winner in both orders only 0.40 of the time"
    assert chance in summary_text(result(0.55, 0.45, 0.65))
    assert "warning" not in summary_text(result(0.8, 0.7, 0.9)) + summary_text(result(0.8, 0.7, 0.9, 0.5))
    text = summary_text(result(0.8, 0.7, 0.9, 0.4))
    assert position in text and "cannot be told from chance" not in text
    assert "  position consistency: 0.400" in text


@pytest.mark.parametrize("mode", ["pointwise", "pairwise"])
def test_gguf_judges_report_verdict_mass_and_consistency(mode):
    # min_verdict_mass 0: the random tiny judge puts about 0.5% on its verdict, under the default 0.5
    cfg = JudgeConfig(type="llama_cpp", mode=mode, model=str(TINY / "judge.gguf"), n_ctx=1024, n_gpu_layers=0,
                      min_verdict_mass=0.0)
    items = [it for it in sanity_items() if it.kind in ("refusal", "truncated")][:12]
    result = check_judge(cfg, items, progress=False)
    assert result["n"] == 12 and 0 < result["verdict_mass"] < 1  # a random tiny judge: some mass, not all
    if mode == "pairwise":
        # by hand from the judge's verdicts in both orders: the same response wins both, or both tie
        from minitpo.judges.pairwise import pairwise_verdicts

        prompts = [it.prompt for it in items]
        ab = pairwise_verdicts(cfg, prompts, [it.chosen for it in items], [it.rejected for it in items])
        ba = pairwise_verdicts(cfg, prompts, [it.rejected for it in items], [it.chosen for it in items])
        same = [(x > 0.5 and y < 0.5) or (x < 0.5 and y > 0.5) or x == y == 0.5 for x, y in zip(ab, ba)]
        assert result["position_consistency"] == pytest.approx(sum(same) / 12)
    else:
        assert "position_consistency" not in result


def test_pointwise_gguf_responses_under_min_verdict_mass_are_unjudged_and_their_items_left_out():
    """The tiny judge's verdict mass per response, from its own scorer with no threshold; judge-check with
    judge.min_verdict_mass at their median must leave unjudged exactly the responses below it, drop every
    item that has one, and score the rest by the higher score, counted here by hand."""
    from minitpo.judges.llama import score_responses

    base = JudgeConfig(type="llama_cpp", model=str(TINY / "judge.gguf"), n_ctx=1024, n_gpu_layers=0, min_verdict_mass=0.0)
    items = [it for it in sanity_items() if it.kind in ("refusal", "truncated")][:12]
    texts = list(dict.fromkeys((it.prompt, r) for it in items for r in (it.chosen, it.rejected)))
    results = dict(zip(texts, score_responses(base, [p for p, _ in texts], [r for _, r in texts], progress=False)))
    threshold = float(np.median([r["score_mass"] for r in results.values()]))
    below = {t for t, r in results.items() if r["score_mass"] < threshold}
    kept = [it for it in items if not {(it.prompt, it.chosen), (it.prompt, it.rejected)} & below]
    assert 0 < len(below) < len(texts) and 0 < len(kept) < len(items)  # the threshold splits them

    result = check_judge(dataclasses.replace(base, min_verdict_mass=threshold), items, progress=False)
    chosen_wins = [1.0 if results[(it.prompt, it.chosen)]["score"] > results[(it.prompt, it.rejected)]["score"] else 0.0
                   for it in kept]  # random float scores: no exact ties
    assert result["unjudged"] == len(below) and result["responses"] == len(texts)
    assert result["n"] == len(kept) and result["accuracy"] == pytest.approx(sum(chosen_wins) / len(kept))
    assert sum(r["n"] for r in result["kinds"].values()) == len(kept)
    assert f"  unjudged: {len(below)} of {len(texts)} responses (verdict mass under judge.min_verdict_mass " \
           f"{threshold})" in summary_text(result)


def test_a_judge_with_no_verdict_mass_judges_no_item_and_is_warned_about(tmp_path):
    """A GGUF whose digits get 9 / 271 of the probability whatever the prompt (write_tiny_gguf's
    digit_logit 0: nine digits and 262 other tokens, all at logit 0): under the default 0.5 every response
    is unjudged, no item is left to score, and the run's check calls that at chance."""
    from test_judges_llama import write_tiny_gguf

    flat = write_tiny_gguf(tmp_path / "flat.gguf", digit_logit=0.0)
    items = [it for it in sanity_items() if it.kind == "refusal"][:3]
    result = check_judge(JudgeConfig(type="llama_cpp", model=str(flat), n_ctx=2048, n_gpu_layers=0), items, progress=False)
    assert result["unjudged"] == result["responses"] == 6 and result["verdict_mass"] == pytest.approx(9 / 271, rel=1e-3)
    assert (result["n"], result["accuracy"]) == (0, None) and result["kinds"]["refusal"]["n"] == 0
    assert at_chance(result) and "a run would pair nothing" in summary_text(result)
    assert headline(result) == "judge-check: no item judged"


def test_judge_check_in_a_run_is_saved_and_warns_at_chance(tmp_path):
    """The rule judge on the sanity set: no sanity instruction asks for a constraint it checks, so it gives
    every answer the same score (checked here) and every item ties: accuracy 0.5, interval (0.5, 0.5),
    at chance, and the run warns."""
    from minitpo import verifiable

    assert {verifiable.score(it.prompt, text) for it in sanity_items() for text in (it.chosen, it.rejected)} == {
        verifiable.NO_CONSTRAINT_SCORE}
    out = tmp_path / "run"
    result = minitpo("run", "recipes/tiny.yaml", "--out", out, "iterations=1", "judge.check=true",
                     "judge.type=python", "judge.function=minitpo.verifiable:score", "train.epochs=1",
                     "train.val_fraction=0")
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.load(open(out / "judge_check.json"))
    assert saved["n"] == 256 and set(saved["kinds"]) == set(KINDS)
    assert (saved["accuracy"], saved["ci_low"], saved["ci_high"]) == (0.5, 0.5, 0.5)
    assert "warning: the judge cannot be told from chance (accuracy 0.50, 95% CI reaches 0.50)" in result.stderr
    assert "judge-check: accuracy 0.500 (95% CI 0.500-0.500) over 256 items" in result.stdout
