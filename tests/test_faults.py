"""Faults through the real CLI (issue 26): a full disk, a read-only run directory, an output path that
cannot be written, a file of the run directory cut short, a python judge that raises, SIGTERM. Each
is one line naming the path and the fix, found before the work it would waste where it can be, and
what was computed before it stays for the rerun.

The disk-full and read-only cases write to a small tmpfs mounted for the test (as root); where it
cannot be mounted they are skipped, and the same code path is covered by the cases that point an
output under a regular file."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest

from conftest import ROOT

QUICK = ["iterations=1", "sampling.k=2", "sampling.max_new_tokens=32", "train.epochs=1", "train.val_fraction=0"]
RULE_JUDGE = ["judge.type=python", "judge.function=minitpo.verifiable:score"]

# A python judge that counts its calls in calls.txt beside it, and raises on call FAIL_AT (0: never).
COUNTING_JUDGE = '''
import os

CALLS = os.path.join(os.path.dirname(__file__), "calls.txt")


def score(instruction, response):
    with open(CALLS, "a") as f:
        f.write("x")
    if os.path.getsize(CALLS) == int(os.environ.get("FAIL_AT", "0")):
        raise RuntimeError("the judge failed on purpose")
    return float(len(response) % 7)
'''


def minitpo(*args, env=None):
    return subprocess.run([sys.executable, "-m", "minitpo", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**os.environ, **(env or {})})


def one_error_line(result) -> str:
    """The one `error:` line of a failed command (progress bars may precede it), with no traceback."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


@contextmanager
def tmpfs(path, size):
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode:
        path.rmdir()
        pytest.skip("a small tmpfs cannot be mounted here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path, options):
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished iteration of the tiny recipe, with the rule judge (no GGUF load)."""
    out = tmp_path_factory.mktemp("faults") / "run"
    result = minitpo("run", "recipes/tiny.yaml", "--out", out, *QUICK, *RULE_JUDGE, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    # offline, as offline users run: no "Skipping publisher trust check for 'kernels-community/...'"
    assert "kernels-community" not in result.stderr, result.stderr[-2000:]
    return out


@pytest.fixture
def judge_file(tmp_path):
    path = tmp_path / "judge" / "counting.py"
    path.parent.mkdir()
    path.write_text(COUNTING_JUDGE)
    return path


def calls(judge_file):
    counter = judge_file.parent / "calls.txt"
    return counter.stat().st_size if counter.exists() else 0


# ------------------------------------------------------------------ outputs checked before the work

@pytest.mark.parametrize("where", ["under a file", "a folder", "read-only"])
def test_judge_check_json_that_cannot_be_written_fails_before_judging(tmp_path, judge_file, where):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    if where == "read-only":
        ro = tmp_path / "ro"
        with tmpfs(ro, "64k"):
            remount(ro, "ro")
            result = minitpo("judge-check", "recipes/tiny.yaml", "judge.type=python", f"judge.function={judge_file}:score",
                             "--json", ro / "result.json")
            line = one_error_line(result)
    else:
        target = tmp_path / ("a_file/result.json" if where == "under a file" else "a_folder")
        result = minitpo("judge-check", "recipes/tiny.yaml", "judge.type=python", f"judge.function={judge_file}:score",
                         "--json", target)
        line = one_error_line(result)
    expected = {"under a file": f"--json: '{tmp_path / 'a_file'}' cannot be created: '{tmp_path / 'a_file'}' is a file",
                "a folder": f"--json: '{tmp_path / 'a_folder'}' is a folder; give the path of a .json file",
                "read-only": f"--json: '{tmp_path / 'ro'}' cannot be written (Read-only file system)"}[where]
    assert expected in line, line
    assert calls(judge_file) == 0  # nothing judged


def test_a_run_directory_on_a_read_only_mount_is_refused_at_load(tmp_path):
    with tmpfs(tmp_path / "ro", "64k") as ro:
        remount(ro, "ro")
        line = one_error_line(minitpo("run", "recipes/tiny.yaml", "--out", ro / "run"))
        assert f"out: '{ro / 'run'}' cannot be written ('{ro}' is not writable); give another directory" in line, line


def test_eval_into_a_read_only_run_directory_fails_before_sampling(finished, tmp_path):
    with tmpfs(tmp_path / "ro", "2m") as ro:
        shutil.copytree(finished, ro / "run")
        remount(ro, "ro")
        result = minitpo("eval", ro / "run")
        line = one_error_line(result)
        assert f"RUN_DIR: '{ro / 'run' / 'eval'}' cannot be written (Read-only file system)" in line, line
        assert "sample" not in result.stderr  # no model sampled


def test_export_under_a_file_fails_before_the_model_loads(finished, tmp_path):
    (tmp_path / "a_file").write_text("x")
    for extra in ([], ["--gguf"]):
        result = minitpo("export", finished / "iter-1", tmp_path / "a_file" / "model.gguf", *extra)
        assert f"OUT: '{tmp_path / 'a_file'}' cannot be created: '{tmp_path / 'a_file'}' is a file" in one_error_line(result)
    assert (tmp_path / "a_file").read_text() == "x"


# ------------------------------------------------------------------ a write that fails, a file cut short

def test_a_full_disk_is_one_line_and_what_was_written_stays(tmp_path):
    """The run's first files fit in 40 KiB, the candidates (about 25 KB, in 4 KiB pages) do not."""
    with tmpfs(tmp_path / "small", "40k") as small:
        out = small / "run"
        result = minitpo("run", "recipes/tiny.yaml", "--out", out, *QUICK, *RULE_JUDGE)
        line = one_error_line(result)
        assert (f"{out / 'iter-1' / 'candidates.jsonl'}: cannot be written (No space left on device); free space "
                "or give a writable location, then run the same command again") in line, line
        kept = {name: (out / name).read_bytes() for name in ("recipe.yaml", "held_out.jsonl", "split.json")}
        assert not list(out.rglob("*.tmp"))  # no half-written file left behind
        remount(small, "size=2m")  # space freed: the same command finishes the run, on the same split
        again = minitpo("run", "recipes/tiny.yaml", "--out", out, *QUICK, *RULE_JUDGE)
        assert again.returncode == 0, again.stderr[-3000:]
        assert {name: (out / name).read_bytes() for name in kept} == kept
        assert (out / "iter-1" / "summary.json").exists()


@pytest.mark.parametrize("name, cut, iterations", [
    ("summary.json", lambda text: text[:40], 2),  # a finished iteration's summary: found before iteration 2 runs
    ("pairs.jsonl", lambda text: text[:len(text) // 2], 1),  # an unfinished iteration's pairs, cut mid-line
])
def test_a_run_file_that_does_not_parse_is_named_with_its_line_and_the_fix(finished, tmp_path, name, cut, iterations):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    if name == "pairs.jsonl":  # iteration 1 died in training: the pair stage's file is read next
        for done in ("summary.json", "train_summary.json", "train_log.jsonl"):
            (out / "iter-1" / done).unlink()
    path = out / "iter-1" / name
    text = path.read_text()
    path.write_text(cut(text))
    line_no = cut(text).count("\n") + 1
    args = ["run", "recipes/tiny.yaml", "--out", out, *QUICK, *RULE_JUDGE, f"iterations={iterations}"]
    line = one_error_line(minitpo(*args))
    assert f"{path}: line {line_no} is not valid JSON" in line, line
    assert line.endswith("delete it and run the same command again to recompute it"), line
    assert not (out / "iter-2").exists()  # nothing computed on top of it

    path.unlink()  # the fix the line gives
    fixed = minitpo(*args)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert json.loads((out / "iter-1" / "summary.json").read_text())["iteration"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == iterations


def test_a_python_judge_that_raises_keeps_the_judgements_it_made(tmp_path, judge_file):
    out = tmp_path / "run"
    args = ["run", "recipes/tiny.yaml", "--out", out, *QUICK, "judge.type=python", f"judge.function={judge_file}:score"]
    failed = minitpo(*args, env={"FAIL_AT": "10"})
    assert failed.returncode != 0 and "the judge failed on purpose" in failed.stderr, failed.stderr[-2000:]
    cache = out / "iter-1" / "judge_cache.jsonl"
    assert len(cache.read_text().splitlines()) == 9  # the nine judgements before the failure
    (judge_file.parent / "calls.txt").unlink()
    again = minitpo(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    judged = len({(r["instruction"], r["response"]) for r in map(json.loads, cache.read_text().splitlines())})
    assert calls(judge_file) == judged - 9  # the rerun judged only the rest


# ------------------------------------------------------------------ SIGTERM

def test_sigterm_is_one_line_exit_143_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "minitpo", "run", "recipes/tiny.yaml", "--out", str(out), *QUICK, *RULE_JUDGE]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start = time.monotonic()
    while not (out / "split.json").exists() and proc.poll() is None and time.monotonic() - start < 300:
        time.sleep(0.02)
    time.sleep(1.0)  # loading the policy, or sampling
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == ("terminated; run the same command again to resume from the last "
                                            "finished stage"), err[-2000:]
    assert "Traceback" not in err
    resumed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "iter-1" / "summary.json").exists() and not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("damage", ["cut", "deleted"])
def test_a_damaged_split_is_refused_never_drawn_again(finished, tmp_path, damage):
    """held_out.jsonl fixes what is never trained on: a new split drawn in its place could train on held-out
    instructions, so a cut or missing one stops the run, with what to do, and nothing is rewritten."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    held = out / "held_out.jsonl"
    if damage == "cut":
        held.write_text(held.read_text()[:30])
    else:
        held.unlink()
    split = (out / "split.json").read_bytes()
    line = one_error_line(minitpo("run", "recipes/tiny.yaml", "--out", out, *QUICK, *RULE_JUDGE, "iterations=2"))
    assert line.startswith(f"error: {held}: " + ("line 1 is not valid JSON" if damage == "cut" else "missing, and split.json is there"))
    assert line.endswith("restore it from a copy, or start over with --fresh"), line
    assert (out / "split.json").read_bytes() == split and not (out / "iter-2").exists()


def test_a_sigterm_dropped_inside_a_destructor_still_stops_the_run_at_the_next_stage(tmp_path):
    """Python runs a signal handler between bytecodes of whatever runs then; inside a __del__ its exception
    is printed and dropped. The flag the handler sets makes the next stage raise it anyway."""
    import gc

    from minitpo import errors
    from minitpo.stages import Stage, Stages

    class Collected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(1000))  # bytecode after the signal: the handler runs here and its raise is dropped

    previous, previous_hook = signal.signal(signal.SIGTERM, errors.terminate), sys.unraisablehook
    dropped = []
    sys.unraisablehook = lambda u: dropped.append(u.exc_type)
    try:
        Collected()
        gc.collect()  # nothing raised: the Terminated was dropped inside __del__
        assert dropped == [errors.Terminated]
        ran = []
        with pytest.raises(errors.Terminated):
            Stages(tmp_path).run(Stage("sample", "candidates.jsonl"), lambda: ran.append(1))
        assert ran == [] and not (tmp_path / "candidates.jsonl").exists()  # the stage never started
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = previous_hook
        errors._terminated = False
