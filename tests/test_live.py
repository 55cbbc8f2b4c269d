"""Live metrics (minitpo/live.py): TensorBoard event files read back with TensorBoard's own reader and a
W&B offline run read back from its .wandb file, each against the run's own files (train_log.jsonl,
summary.json, stages.json); a resumed run's curves hold each step once; log.to's default and its one-line
error."""

import json
import shutil
import struct
import sys

import pytest

from conftest import ROOT
from minitpo.errors import UserError
from minitpo.live import UPDATE_KEYS, Live
from minitpo.recipe import load_recipe, recipe_to_dict
from test_cli import QUICK, jsonl, minitpo

TINY_RECIPE = ROOT / "recipes" / "tiny.yaml"
QUICK = [*QUICK, "data.per_iteration=8"]  # the tiny file's 32 instructions beside the held-out ones: 4 iterations


def scalars(folder):
    """{tag: [(step, value)]} as TensorBoard reads the folder (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected_train(out, iterations):
    """{tag: [(global step, value)]} from the train logs: step 1 onward, across the iterations in order."""
    rows = [r for t in iterations for r in jsonl(out / f"iter-{t}" / "train_log.jsonl")]
    return {f"train/{k}": [(n, r[k]) for n, r in enumerate(rows, start=1)] for k in UPDATE_KEYS}


def expected_iterations(out, iterations):
    want = {}
    for t in iterations:
        summary = json.load(open(out / f"iter-{t}" / "summary.json"))
        for k in ("parse_rate", "marker_rate", "judge_score", "thought_chars", "response_chars", "pairs",
                  "pairs_trained", "train_loss", "reward_accuracy"):
            want.setdefault(f"iteration/{k}", []).append((t, summary[k]))
        for stage, seconds in summary["stage_wall_s"].items():
            want.setdefault(f"stage_wall_s/{stage}", []).append((t, seconds))
    return want


def assert_points(got, want):
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag  # each step once, in order
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory):
    pytest.importorskip("tensorboard")
    out = tmp_path_factory.mktemp("live") / "run"
    first = minitpo("run", TINY_RECIPE, "--out", out, "log.to=tensorboard", *QUICK)
    assert first.returncode == 0, first.stderr[-3000:]
    return out


def test_tensorboard_curves_hold_the_train_log_and_the_summaries(tb_run):
    out = tb_run
    train, iteration = scalars(out / "logs" / "train"), scalars(out / "logs" / "iteration")
    assert set(train) == {f"train/{k}" for k in UPDATE_KEYS}
    assert len(train["train/loss"]) == sum(len(jsonl(out / f"iter-{t}" / "train_log.jsonl")) for t in (1, 2)) > 2
    assert_points(train, expected_train(out, (1, 2)))
    assert_points(iteration, expected_iterations(out, (1, 2)))


def test_a_rerun_iteration_and_a_third_continue_the_curves_each_step_once(tb_run, tmp_path):
    """Iteration 2 killed in training (its training outputs gone, its points already in the event files):
    the resume trains it again, then runs a third; every step is on the curves once, with the values of
    the train logs as they are now."""
    out = tmp_path / "run"
    shutil.copytree(tb_run, out)
    it2 = out / "iter-2"
    for name in ("summary.json", "train_summary.json", "train_log.jsonl"):
        (it2 / name).unlink()
    shutil.rmtree(it2 / "adapter")
    resumed = minitpo("run", TINY_RECIPE, "--out", out, "log.to=tensorboard", "iterations=3", *QUICK)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "train" in resumed.stderr and len(list((out / "logs" / "train").iterdir())) == 2  # a second event file
    train, iteration = scalars(out / "logs" / "train"), scalars(out / "logs" / "iteration")
    assert_points(train, expected_train(out, (1, 2, 3)))
    assert_points(iteration, expected_iterations(out, (1, 2, 3)))


def test_a_second_process_hides_the_points_a_killed_one_wrote_past_its_first_step(tmp_path):
    """Without a model: iteration 1 done (3 updates), iteration 2 killed after 2 updates, then trained
    again in a new process with other values: steps 1-6 once each, 4-6 from the second attempt."""
    pytest.importorskip("tensorboard")
    import time

    (tmp_path / "iter-1").mkdir()
    (tmp_path / "iter-1" / "train_summary.json").write_text('{"updates": 3}')
    row = {k: 0.0 for k in UPDATE_KEYS}
    with Live("tensorboard", tmp_path) as live:
        for step in (1, 2, 3):
            live.update(1, {**row, "step": step, "loss": 0.1 * step})
        for step in (1, 2):
            live.update(2, {**row, "step": step, "loss": 9.0})  # the killed attempt
    time.sleep(1.1)  # a new process: its event file's name sorts after (it starts with the time in seconds)
    with Live("tensorboard", tmp_path) as live:
        for step in (1, 2, 3):
            live.update(2, {**row, "step": step, "loss": 1.0 + step})
    got = scalars(tmp_path / "logs" / "train")["train/loss"]
    assert got == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)), (3, pytest.approx(0.3)), (4, 2.0), (5, 3.0), (6, 4.0)]


def test_nothing_is_written_with_none_or_off_rank_0(tmp_path):
    row = {**{k: 1.0 for k in UPDATE_KEYS}, "step": 1}
    for live in (Live("none", tmp_path), Live("tensorboard", tmp_path, main=False)):
        live.update(1, row)
        live.iteration(1, {"parse_rate": 0.5, "stage_wall_s": {"sample": 1.0}})
        live.close()
    assert not (tmp_path / "logs").exists()


def wandb_history(path):
    """The history rows of a .wandb file: wandb 0.31 ships no Python reader, so the LevelDB-log framing
    wandb-core writes (a 7-byte file header, 32 KiB blocks, records with a 7-byte header: CRC, length,
    type full/first/middle/last) is undone here and each record parsed with wandb's own protobuf."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, parts, rows = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # the block's zero padding
            pos += block - pos % block
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_same_numbers_and_a_resume_sends_each_step_once(tmp_path, monkeypatch):
    """One iteration, then a second process runs the second, then a third trains the second again (as if
    killed in training): no network (WANDB_MODE=offline). W&B holds each step once."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("CONFIG", "CACHE", "DATA"):  # nothing into the user's home
        monkeypatch.setenv(f"WANDB_{name}_DIR", str(tmp_path / f"wandb-{name.lower()}"))
    out = tmp_path / "run"
    first = minitpo("run", TINY_RECIPE, "--out", out, "log.to=wandb", "iterations=1", *QUICK)
    assert first.returncode == 0, first.stderr[-3000:]
    second = minitpo("run", TINY_RECIPE, "--out", out, "log.to=wandb", "iterations=2", *QUICK)
    assert second.returncode == 0, second.stderr[-3000:]
    # what was sent: W&B keeps it (a rerun's tokens_per_s and train stage time differ)
    want, want_iterations = expected_train(out, (1, 2)), expected_iterations(out, (1, 2))
    for name in ("summary.json", "train_summary.json", "train_log.jsonl"):
        (out / "iter-2" / name).unlink()
    third = minitpo("run", TINY_RECIPE, "--out", out, "log.to=wandb", "iterations=2", *QUICK)
    assert third.returncode == 0 and "train" in third.stderr, third.stderr[-3000:]
    state = json.load(open(out / "logs" / "wandb.json"))
    runs = sorted((out / "logs" / "wandb").glob(f"offline-run-*-{state['id']}"))
    assert len(runs) == 3  # one per process, one run id: `wandb sync` puts them together
    rows = [r for run in runs for r in wandb_history(run / f"run-{state['id']}.wandb")]
    train = [r for r in rows if "train/step" in r]
    assert [r["train/step"] for r in train] == [s for s, _ in want["train/loss"]]  # each once, in order
    for k in UPDATE_KEYS:
        assert [r[f"train/{k}"] for r in train] == pytest.approx([v for _, v in want[f"train/{k}"]]), k
    iters = [r for r in rows if "iteration" in r]
    assert [r["iteration"] for r in iters] == [1, 2]
    for tag, points in want_iterations.items():
        assert [r[tag] for r in iters] == pytest.approx([v for _, v in points]), tag
    assert state["train_step"] == len(train) and state["iteration"] == 2


def test_log_to_defaults_to_what_is_installed_and_is_recorded(monkeypatch):
    pytest.importorskip("tensorboard")
    assert load_recipe(TINY_RECIPE).log.to == "tensorboard"
    assert recipe_to_dict(load_recipe(TINY_RECIPE))["log"] == {"to": "tensorboard"}  # into recipe.yaml
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if neither were installed
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert load_recipe(TINY_RECIPE).log.to == "none"


@pytest.mark.parametrize("to", ["wandb", "tensorboard"])
def test_a_logger_that_is_not_installed_is_one_line_at_load(monkeypatch, to):
    monkeypatch.setitem(sys.modules, to, None)
    with pytest.raises(UserError) as e:
        load_recipe(TINY_RECIPE, [f"log.to={to}"])
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"log.to: {to!r}") and f"pip install {to}" in message
    assert "log.to=none" in message  # the other fix
    assert load_recipe(TINY_RECIPE, [f"log.to={to}"], check_files=False).log.to == to  # a finished run's recipe


def test_the_cli_says_it_in_one_line_with_status_2_before_anything_loads(tmp_path):
    import subprocess

    hide = "import sys; sys.modules['wandb'] = None; from minitpo.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", hide, "run", str(TINY_RECIPE), "--out", str(tmp_path / "run"),
                             "log.to=wandb"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert result.stderr.startswith("error: log.to: 'wandb' needs the wandb package")
    assert not (tmp_path / "run").exists()
