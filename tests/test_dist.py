"""`torchrun --nproc-per-node 2 -m minitpo run` on CPU (gloo) against one process, on the tiny recipe: the
same instruction slices, the same candidates (greedy, and sampled: seeds are per candidate), scores and
pairs, and adapter weights within ADAPTER_TOL after one iteration; the run directory holds the same
files, stages.json records world_size, and a one-process run resumes a two-process one."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import ROOT

# Measured 2.4e-7 (adapter weights up to 0.09): the two runs differ only in float summation order
# (gradients summed over two processes, reference log-probs from smaller batches, 1.9e-6 apart).
ADAPTER_TOL = 1e-5
REF_TOL = 1e-4
# Dropout draws differ per process, and bf16 autocast's rounding (train.autocast auto, on a CPU with native
# bf16) depends on a batch's padded width, which sharding changes: both off, to compare.
COMPARABLE = ["policy.lora_dropout=0", "train.autocast=none"]
SETTINGS = ["iterations=1", *COMPARABLE]


def minitpo_run(out, *overrides, processes=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)] if processes > 1 \
        else [sys.executable]
    result = subprocess.run([*launcher, "-m", "minitpo", "run", "recipes/tiny.yaml", "--out", str(out), *SETTINGS,
                             *overrides], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    one = minitpo_run(d / "one")
    two = minitpo_run(d / "two", processes=2)
    return d / "one", d / "two", one, two


def test_two_processes_write_what_one_writes(runs):
    one, two, r1, r2 = runs
    a, b = one / "iter-1", two / "iter-1"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())  # no rank-1 leftovers
    ca, cb = rows(a / "candidates.jsonl"), rows(b / "candidates.jsonl")
    assert [c["instruction_id"] for c in ca] == [c["instruction_id"] for c in cb]  # the same slice, in order
    assert len({c["text"] for c in ca}) > len(ca) // 2, "sampled: candidates must differ from one another"
    assert ca == cb
    assert (a / "scores.jsonl").read_text() == (b / "scores.jsonl").read_text()
    pa, pb = rows(a / "pairs.jsonl"), rows(b / "pairs.jsonl")
    assert len(pa) == len(pb) >= 8
    for x, y in zip(pa, pb):
        assert {k: v for k, v in x.items() if not k.startswith("ref_")} == {k: v for k, v in y.items() if not k.startswith("ref_")}
        for k in ("ref_chosen_logps", "ref_rejected_logps"):
            assert x[k] == pytest.approx(y[k], abs=REF_TOL)
    wa = load_file(a / "adapter" / "adapter_model.safetensors")
    wb = load_file(b / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < ADAPTER_TOL
    assert max(float(wa[k].abs().max()) for k in wa if "lora_B" in k) > 100 * ADAPTER_TOL, "training must move B"
    assert json.loads((a / "stages.json").read_text())["world_size"] == 1
    assert json.loads((b / "stages.json").read_text())["world_size"] == 2
    assert r2.stdout.count("iter 1:") == 1, "rank 0 alone prints"


def test_greedy_candidates_do_not_depend_on_the_number_of_processes(tmp_path):
    # Greedy K candidates are the same unless some are forced and some not: a run refuses greedy otherwise.
    greedy = ["sampling.temperature=0", "sampling.force_marker=true", "sampling.unforced=1"]
    minitpo_run(tmp_path / "one", *greedy)
    minitpo_run(tmp_path / "two", *greedy, processes=2)
    assert (tmp_path / "one/iter-1/candidates.jsonl").read_text() == (tmp_path / "two/iter-1/candidates.jsonl").read_text()


def test_rank_0_alone_logs_the_live_curves(runs):
    """Under torchrun one event file per kind (rank 1 writes none), holding the train log's loss. Before
    test_one_process_resumes_a_two_process_run, whose process adds its own files to the same run."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, two, _, _ = runs
    assert len(list((two / "logs" / "train").iterdir())) == 1 and len(list((two / "logs" / "iteration").iterdir())) == 1
    acc = EventAccumulator(str(two / "logs" / "train"), size_guidance={"scalars": 0})
    acc.Reload()
    logged = rows(two / "iter-1" / "train_log.jsonl")
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == \
        [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in logged]


def test_one_process_resumes_a_two_process_run(runs):
    _, two, _, _ = runs
    before = (two / "iter-1" / "candidates.jsonl").stat().st_mtime_ns
    result = subprocess.run([sys.executable, "-m", "minitpo", "run", "recipes/tiny.yaml", "--out", str(two), "iterations=2",
                             *COMPARABLE], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (two / "iter-1" / "candidates.jsonl").stat().st_mtime_ns == before  # finished: not redone
    assert "iter 1:" not in result.stdout and "iter 2:" in result.stdout
    assert json.loads((two / "iter-2" / "stages.json").read_text())["world_size"] == 1


def test_a_user_error_stops_every_process_in_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text("policy: {model: other}\n")  # another recipe's run directory
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "minitpo",
                             "run", "recipes/tiny.yaml", "--out", str(tmp_path / "run")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "holds a run of a different recipe" in ours[0], result.stderr[-2000:]

