"""minitpo/summary.py and the layout half of minitpo/rundir.py: the summary the loop writes is the one
the report reads, its numbers from a hand-built iteration, and iteration names, finished iterations
and adapters as every command sees them."""

import pytest

from minitpo import report, rundir
from minitpo.sample import Candidate
from minitpo.summary import read_metrics, summarize, write_summary

MARKER = "Here is my response:"


def _iteration():
    """Two instructions x 2 candidates: one forced, one natural marker, one failure."""
    def cand(i, k, response, parsed=True, forced=False, truncated=False, thought="thinking"):
        text = f"{thought} {MARKER} {response}" if parsed else "rambling on"
        return Candidate(instruction_id=i, instruction="Say hi. Write your whole answer in lowercase letters only, with no capital letters." if i == 0 else "Say bye.",
                         prompt="p", index=k, text=text, thought=thought if parsed else "",
                         response=response if parsed else "", parsed=parsed, n_tokens=10,
                         truncated=truncated, forced=forced)
    candidates = [cand(0, 0, "hi there", forced=True), cand(0, 1, "HI THERE"),
                  cand(1, 0, "bye now", thought="I will say bye to them"), cand(1, 1, "", parsed=False, truncated=True)]
    scores = [{"instruction_id": 0, "index": 0, "score": 9.0, "rho": 0.0, "final": 9.0},
              {"instruction_id": 0, "index": 1, "score": 3.0, "rho": 0.0, "final": 3.0},
              {"instruction_id": 1, "index": 0, "score": 6.0, "rho": 0.0, "final": 6.0}]
    pairs = [{"instruction_id": 0, "chosen_index": 0, "rejected_index": 1, "rejected_parsed": True,
              "skipped": False, "prompt_truncated": False},
             {"instruction_id": 1, "chosen_index": 0, "rejected_index": 1, "rejected_parsed": False,
              "skipped": False, "prompt_truncated": False}]
    logs = [{"epoch": 1, "loss": 0.7, "reward_accuracy": 0.5, "margin": 0.1},
            {"epoch": 2, "loss": 0.5, "reward_accuracy": 1.0, "margin": 0.3}]
    train = {"epochs": [{"epoch": 1}, {"epoch": 2}], "best_epoch": 2}
    return candidates, scores, pairs, logs, train, {"verdict_mass": 0.8, "responses_cut": 1}, {"sample": 1.5}


def test_summary_numbers_from_a_hand_built_iteration():
    s = summarize(1, *_iteration(), marker=MARKER)
    assert s["parse_rate"] == 0.75 and s["truncated_rate"] == 0.25 and s["forced_rate"] == 0.25
    assert s["marker_rate"] == 0.5  # two unforced outputs wrote the marker; the failure did not
    assert s["thought_rate"] == 0.25  # of those two, one thought has 5 words or more
    assert s["judge_score"] == 6.0 and s["chosen_score"] == 7.5 and s["rejected_score"] == 3.0
    assert s["constraint_pass_rate"] == 0.5  # instruction 0's lowercase constraint: met once, failed once
    assert s["train_loss"] == 0.5 and s["reward_accuracy"] == 1.0  # the last epoch only
    assert s["pairs_trained"] == 2 and s["rejected_parse_failures"] == 1 and s["judge_prompts_cut"] == 1


def test_every_key_the_report_reads_is_one_the_summary_writes():
    written = set(summarize(1, *_iteration(), marker=MARKER))
    drawn = {key for _, _, _, panels in report.ITERATION_FIGURES for _, _, lines, _ in panels for key, _, _ in lines}
    from_eval = {"win_rate", "lc_win_rate", "heldout_marker_rate"}  # these join from eval/
    tabulated = {key for _, key, _ in report.COLUMNS}
    assert (drawn | tabulated) - from_eval <= written, sorted((drawn | tabulated) - from_eval - written)


def test_write_summary_marks_finished_and_read_metrics_returns_them_in_order(tmp_path):
    s1, s2 = (summarize(t, *_iteration(), marker=MARKER) for t in (1, 2))
    write_summary(tmp_path, 2, s2)  # iteration 2 may finish before a resumed 1 is rewritten: order by number
    write_summary(tmp_path, 1, s1)
    assert rundir.finished_iterations(tmp_path) == [1, 2]
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [1, 2]
    assert read_metrics(tmp_path / "none") == []


def test_iteration_names_and_adapters(tmp_path):
    assert rundir.iteration_name(3) == "iter-3" and rundir.iteration_number("iter-3") == 3
    assert rundir.iteration_number("seed") == 0
    for name in ("iter-x", "iter-", "iteration-2", "iter-2b", None):
        assert rundir.iteration_number(name) is None
    (tmp_path / "iter-1" / "adapter").mkdir(parents=True)
    assert not rundir.has_adapter(rundir.adapter_dir(tmp_path, "iter-1"))  # a folder without its config
    (tmp_path / "iter-1" / "adapter" / "adapter_config.json").write_text("{}")
    assert rundir.has_adapter(rundir.adapter_dir(tmp_path, "iter-1"))
    (tmp_path / "iter-10").mkdir()
    (tmp_path / "iter-10" / "summary.json").write_text("{}")
    (tmp_path / "iter-x").mkdir()
    (tmp_path / "iter-x" / "summary.json").write_text("{}")
    assert rundir.finished_iterations(tmp_path) == [10]  # iter-1 has not finished; iter-x is no iteration


@pytest.mark.parametrize("fresh", [False, True])
def test_lock_refuses_a_second_holder_and_clear_keeps_it(tmp_path, fresh):
    from minitpo.errors import UserError

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "old.txt").write_text("x")
    rundir.mark(tmp_path / "run")  # minitpo's: clear may delete it
    (tmp_path / "run" / ".candidates.jsonl.abc.tmp").write_text("half")
    with rundir.lock(tmp_path / "run"):
        with pytest.raises(UserError, match=r"is in use by another minitpo run \(pid \d+\)"):
            with rundir.lock(tmp_path / "run"):  # a second open file description: flock refuses it too
                pass
        assert rundir.remove_stale_temps(tmp_path / "run") == 1
        if fresh:
            rundir.clear(tmp_path / "run")
        left = sorted(p.name for p in (tmp_path / "run").iterdir())
        assert left == ([".lock"] if fresh else [".lock", ".minitpo", "old.txt"])
    with rundir.lock(tmp_path / "run"):  # released on exit
        pass


@pytest.mark.parametrize("files", [["thesis.tex"], ["recipe.yaml", "notes.txt"], ["held_out.jsonl"]])
def test_clear_refuses_a_folder_minitpo_did_not_make(tmp_path, files):
    """--fresh deletes only a folder with minitpo's marker, or a run from before the marker (recipe.yaml
    and held_out.jsonl): a folder of anything else is refused in one line and left as it was."""
    from minitpo.errors import UserError

    for name in files:
        (tmp_path / name).write_text("mine")
    with rundir.lock(tmp_path):
        with pytest.raises(UserError, match="is not a run directory minitpo made"):
            rundir.clear(tmp_path)
    assert all((tmp_path / name).read_text() == "mine" for name in files)
    (tmp_path / "held_out.jsonl").write_text("")  # recipe.yaml + held_out.jsonl: a run from before the marker
    if (tmp_path / "recipe.yaml").exists():
        with rundir.lock(tmp_path):
            rundir.clear(tmp_path)
        assert [p.name for p in tmp_path.iterdir()] == [".lock"]


@pytest.mark.parametrize("pairs, trained, train_summary, expected", [
    (0, 0, {"updates": 0}, ["no pairs: no instruction had a better and a worse candidate"]),
    (16, 0, {"updates": 0}, ["all 16 pairs are longer than train.max_length"]),
    (16, 6, {"n_train_pairs": 6, "n_val_pairs": 0, "updates": 2}, ["10 of 16 pairs are longer than train.max_length"]),
    (16, 16, {"n_train_pairs": 2, "n_val_pairs": 14, "updates": 1},
     ["train.val_fraction set 14 of 16 pairs aside to pick an epoch and 2 were trained on"]),
    (16, 16, {"n_train_pairs": 12, "n_val_pairs": 4, "updates": 3}, []),
    (16, 8, {"n_train_pairs": 8, "n_val_pairs": 0, "updates": 2}, []),  # half skipped: not "most"
])
def test_an_iteration_that_trains_on_little_or_nothing_is_flagged(pairs, trained, train_summary, expected):
    from minitpo.summary import training_warnings

    found = training_warnings(pairs, trained, train_summary)
    assert len(found) == len(expected) and all(f.startswith(e) for f, e in zip(found, expected)), found


def test_the_report_lists_the_warnings_of_each_iteration(tmp_path):
    candidates, scores, pairs, logs, train, stats, times = _iteration()
    skipped = [{**p, "skipped": True} for p in pairs]
    write_summary(tmp_path, 1, summarize(1, candidates, scores, skipped, [], {"updates": 0}, stats, times, marker=MARKER))
    text = report.write_report(tmp_path).read_text()
    assert "## Warnings" in text and "- iter 1: all 2 pairs are longer than train.max_length" in text


RESOLVED = {"policy": {"model": "m"}, "data": {"instructions": "i.jsonl"}, "judge": {"n_ctx": 64, "rho": 0.0},
            "sampling": {"k": 4}, "train": {"lr": 1e-4, "max_length": 256, "loss": "ipo"}, "iterations": 2}


@pytest.mark.parametrize("done, change, refused", [
    ([], ("judge", "n_ctx", 512), None),  # nothing ran yet: any fixed setting is taken
    (["candidates.jsonl"], ("judge", "n_ctx", 512), None),  # the judge died after sampling: fix it, keep the samples
    (["candidates.jsonl", "scores.jsonl", "pairs.jsonl"], ("train", "loss", "sigmoid"), None),  # died in training
    (["candidates.jsonl", "scores.jsonl"], ("train", "max_length", 512), None),
    (["candidates.jsonl", "scores.jsonl", "pairs.jsonl"], ("train", "max_length", 512), "iter-1 ran its pair stage"),
    (["candidates.jsonl", "scores.jsonl"], ("judge", "rho", 0.2), "iter-1 ran its judge stage"),
    (["candidates.jsonl"], ("sampling", "k", 8), "iter-1 ran its sample stage"),
    ([], ("policy", "model", "other"), "the policy and the data define a run"),
    ([], ("data", "instructions", "other.jsonl"), "the policy and the data define a run"),
    (["candidates.jsonl", "scores.jsonl", "pairs.jsonl", "train_summary.json"], ("iterations", None, 4), None),
])
def test_a_resumed_run_takes_a_setting_whose_stage_has_not_run(tmp_path, done, change, refused):
    import copy

    from minitpo.errors import UserError

    assert rundir.claim(tmp_path, RESOLVED) == []
    (tmp_path / "iter-1").mkdir()
    for name in done + ["judge_cache.jsonl"]:
        (tmp_path / "iter-1" / name).write_text("{}\n")
    section, key, value = change
    changed = copy.deepcopy(RESOLVED)
    if key:
        changed[section][key] = value
    else:
        changed[section] = value
    before = (tmp_path / "recipe.yaml").read_text()
    if refused:
        with pytest.raises(UserError, match=f"holds a run of a different recipe \\({section}.{key} differs, and {refused}"):
            rundir.claim(tmp_path, changed)
        assert (tmp_path / "recipe.yaml").read_text() == before and (tmp_path / "iter-1" / "judge_cache.jsonl").exists()
        return
    taken = rundir.claim(tmp_path, changed)
    assert taken == ([f"{section}.{key}"] if key and section != "iterations" else [])
    import yaml

    assert yaml.safe_load((tmp_path / "recipe.yaml").read_text()) == changed
    # a changed judge drops the old judge's unfinished judgements; nothing else is touched
    assert (tmp_path / "iter-1" / "judge_cache.jsonl").exists() == (section != "judge")
    assert all((tmp_path / "iter-1" / name).exists() for name in done)
