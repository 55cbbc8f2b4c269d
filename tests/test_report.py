"""`minitpo report` on run directories written by hand: every plot and the table, gaps in the metrics,
eval results present or not, and the user error for a run with no finished iteration."""

import json
import struct
import subprocess
import sys

import pytest

from conftest import ROOT
from minitpo.errors import UserError
from minitpo.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_PLOTS = {"scores.png", "lengths.png", "format.png", "constraints.png", "dpo.png", "training.png"}


def summary(t, **changes):
    """A metrics.jsonl row shaped like loop.summarize's, with numbers that drift over iterations."""
    row = {"iteration": t, "instructions": 16, "candidates": 64, "parse_rate": 0.6 + 0.05 * t,
           "truncated_rate": 0.1, "judge_score": 5.0 + 0.4 * t, "thought_chars": 300.0 - 40 * t,
           "response_chars": 200.0 + 5 * t, "rho": 0.2, "pairs": 16, "pairs_trained": 15,
           "pairs_skipped_too_long": 1, "rejected_parse_failures": 4, "chosen_score": 6.5 + 0.3 * t,
           "rejected_score": 3.5 + 0.2 * t, "chosen_response_chars": 210.0, "rejected_response_chars": 190.0,
           "train_loss": 0.69 - 0.05 * t, "reward_accuracy": 0.5 + 0.1 * t, "reward_margin": 0.02 * t,
           "best_epoch": 2, "stage_wall_s": {"sample": 1.0, "judge": 1.0, "pair": 1.0, "train": 1.0},
           "marker_rate": 0.1 * t, "forced_rate": 0.9 - 0.1 * t, "constraint_pass_rate": 0.3 + 0.1 * t}
    row.update(changes)
    return row


def train_log(n, **changes):
    return [{"epoch": 1 + (i >= n // 2), "step": i + 1, "loss": 0.69 - 0.02 * i, "chosen_reward": 0.01 * i,
             "rejected_reward": -0.01 * i, "reward_accuracy": min(1.0, 0.4 + 0.1 * i), "margin": 0.02 * i,
             "grad_norm": 1.0, "lr": 5e-4, "tokens_per_s": 1000.0, **changes} for i in range(n)]


def write_run(run, rows, logs=None):
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for t, log in (logs or {}).items():
        (run / f"iter-{t}").mkdir(exist_ok=True)
        (run / f"iter-{t}" / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return run


def assert_png(path, min_bytes=5000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk follows the magic
    assert width >= 300 and height >= 200 and len(data) >= min_bytes, (path.name, width, height, len(data))


def test_full_run_gets_every_plot_and_a_table(tmp_path):
    run = write_run(tmp_path / "run", [summary(t) for t in (1, 2, 3)], {t: train_log(6) for t in (1, 2, 3)})
    report = write_report(run)

    assert report == run / "report.md"
    assert {p.name for p in (run / "report").iterdir()} == ALL_PLOTS  # no eval/: no win-rate plot
    for name in ALL_PLOTS:
        assert_png(run / "report" / name)
    text = report.read_text()
    for name in ALL_PLOTS:
        assert f"](report/{name})" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 3  # header + one row per iteration
    assert table[1].split("|")[1:4] == [" 1 ", " 0.65 ", " 5.40 "]  # iteration, parse rate, judge score
    # natural marker rate, the held-out one (from eval/: none here), constraints met
    assert table[1].split("|")[4:7] == [" 0.10 ", " - ", " 0.40 "]
    assert "win_rate" not in text


def test_missing_keys_and_none_values_leave_gaps_not_errors(tmp_path):
    rows = [
        summary(1, train_loss=None, reward_accuracy=None, reward_margin=None, rejected_score=None),
        {"iteration": 2, "judge_score": 5.5, "parse_rate": 0.7},  # an old or partial summary
        summary(3, thought_chars=float("nan")),
    ]
    logs = {1: [], 2: train_log(4, loss=None), 3: [{"epoch": 1, "step": 1}]}  # no updates, no loss, nothing
    run = write_run(tmp_path / "run", rows, logs)
    text = write_report(run).read_text()

    for name in ALL_PLOTS - {"training.png"}:
        assert_png(run / "report" / name)
    assert_png(run / "report" / "training.png", min_bytes=2000)  # accuracy only, from iteration 2
    row2 = next(line for line in text.splitlines() if line.startswith("| 2 |"))
    assert row2.count(" - ") >= 8  # every value the run did not record shows as "-"


def test_a_figure_with_nothing_to_draw_is_left_out(tmp_path):
    run = write_run(tmp_path / "run", [{"iteration": 1, "judge_score": 4.0}])  # and no train_log at all
    text = write_report(run).read_text()
    assert {p.name for p in (run / "report").iterdir()} == {"scores.png"}
    assert "report/scores.png" in text and "report/training.png" not in text


def test_eval_results_become_a_win_rate_plot_and_a_column(tmp_path):
    run = write_run(tmp_path / "run", [summary(t) for t in (1, 2)], {t: train_log(4) for t in (1, 2)})
    (run / "eval").mkdir()
    for t, (rate, low, high) in {1: (0.55, 0.45, 0.65), 2: (0.62, 0.52, 0.71)}.items():
        lc = {"win_rate": 0.57, "ci_low": 0.45, "ci_high": 0.69, "n": 90} if t == 2 else None
        (run / "eval" / f"iter-{t}-vs-seed.json").write_text(json.dumps(
            {"against": "seed", "model": f"iter-{t}", "win_rate": rate, "ci_low": low, "ci_high": high, "n": 100,
             "length_controlled": lc}))
    (run / "eval" / "iter-2-vs-iter-1.json").write_text(json.dumps(
        [{"against": "iter-1", "model": "iter-2", "win_rate": 0.58, "ci_low": None, "ci_high": None}]))
    (run / "eval" / "broken.json").write_text("{not json")
    (run / "eval" / "other.json").write_text(json.dumps({"model": "gpt", "win_rate": 0.5}))

    text = write_report(run).read_text()
    assert_png(run / "report" / "win_rate.png")
    assert "](report/win_rate.png)" in text
    row1, row2 = (next(line for line in text.splitlines() if line.startswith(f"| {t} |")) for t in (1, 2))
    assert row2.endswith(" 0.62 | 0.57 |")  # the win rates against the seed, raw and length-controlled, join the table
    assert row1.endswith(" 0.55 | - |")  # an evaluation without a length-controlled rate leaves a gap
    assert "skipped eval/broken.json" in text and "skipped a result in eval/other.json" in text


def test_report_replaces_stale_plots(tmp_path):
    run = write_run(tmp_path / "run", [summary(1)], {1: train_log(4)})
    write_report(run)
    (run / "iter-1" / "train_log.jsonl").unlink()
    write_report(run)
    assert not (run / "report" / "training.png").exists()


@pytest.mark.parametrize("make", [
    lambda run: None,  # no directory at all
    lambda run: run.mkdir(),  # a run that never finished an iteration
    lambda run: (run.mkdir(), (run / "metrics.jsonl").write_text("")),
])
def test_no_finished_iteration_is_a_user_error(tmp_path, make):
    run = tmp_path / "run"
    make(run)
    with pytest.raises(UserError, match="minitpo run|not a directory"):
        write_report(run)


def test_report_through_the_cli(tmp_path):
    run = write_run(tmp_path / "run", [summary(1), summary(2)], {1: train_log(3), 2: train_log(3)})
    result = subprocess.run([sys.executable, "-m", "minitpo", "report", str(run)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "report.md" in result.stdout and (run / "report.md").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run([sys.executable, "-m", "minitpo", "report", str(empty)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert str(empty) in lines[0] and "minitpo run" in lines[0]
