"""The run directory's layout and its single writer. Every other module asks here what an iteration
is called, whether it finished and where its adapter is.

Layout: RUN_DIR/iter-N/ per iteration (N from 1); an iteration is finished when its summary.json
exists (written last); its model is the adapter in iter-N/adapter/ (adapter_config.json marks it
complete); "seed" names the base model, iteration 0. RUN_DIR/metrics.jsonl repeats the finished
summaries in order (minitpo.summary owns what a summary holds).

`resolve_adapter(path)` turns an iteration folder or a bare peft adapter folder into the settings to
load and prompt its model (for chat and export).

The writer: `lock(out)` is held for the whole of `minitpo run` and refuses, in one line, a directory
another process holds; `clear(out)` is what --fresh does, under that lock; `remove_stale_temps(out)`
removes the temporary files a killed process left behind.

Only minitpo's own folders are ever deleted. `claim` writes RUN_DIR/.minitpo before the run's first
file; `check_out(out, fresh)` refuses, before anything loads or is written, --fresh on a folder
without it (a run from before the marker counts by its recipe.yaml and held_out.jsonl) and a run into
a folder of someone else's files; `clear` checks again under the lock.

The lock is `flock` on RUN_DIR/.lock: the kernel releases it when the holding process exits, however it
exits (SIGKILL included), so a killed run never leaves it stuck; the file itself staying behind means
nothing. The holder's pid is written into it, for the message a second run prints.
"""

import fcntl
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

from minitpo.config import PolicyConfig, SamplingConfig, ThoughtConfig
from minitpo.data import Instruction
from minitpo.errors import UserError
from minitpo import io
from minitpo.io import read_json
from minitpo.prompts import Template, load_template

# In RUN_DIR/:
LOCK = ".lock"
MARKER = ".minitpo"  # written when a run claims its directory: --fresh deletes only a folder that has it
RECIPE = "recipe.yaml"  # the resolved recipe
HELD_OUT = "held_out.jsonl"  # the instructions kept for evaluation, never trained on
SPLIT = "split.json"  # each iteration's instructions, fixed when the run starts
METRICS = "metrics.jsonl"  # the finished summaries, in order
JUDGE_PROMPT = "judge_prompt.txt"  # the pointwise GGUF judge's prompt, as it ran
JUDGE_CHECK = "judge_check.json"  # judge.check's result, once per run directory
EVAL = "eval"  # eval/{model}-vs-{against}.json and .jsonl
BENCH = "bench"  # bench/{suite}.json and bench/{suite}/ per model
REPORT = "report.md"  # `minitpo report`, with its plots in REPORT_PLOTS/
REPORT_PLOTS = "report"
# In iter-N/, one stage's files each (minitpo/stages.py names which one marks the stage done):
CANDIDATES = "candidates.jsonl"  # sample: K outputs per instruction, split into thought and response
JUDGE_CACHE = "judge_cache.jsonl"  # judge: every judgement so far (a killed judge stage resumes from it)
JUDGE_STATS = "judge_stats.json"  # judge: parse failures and the like
SCORES = "scores.jsonl"  # judge: raw score, response length, length-controlled score
PAIRS = "pairs.jsonl"  # pair: chosen/rejected with the reference log-probs of M_{N-1}
ADAPTER = "adapter"  # train: the LoRA adapter of model N
TRAIN_LOG = "train_log.jsonl"  # train: one line per optimizer update
TRAIN_SUMMARY = "train_summary.json"  # train: epochs, best epoch
STAGES = "stages.json"  # each stage's wall time and peak memory
SUMMARY = "summary.json"  # written last: the iteration is finished
LOGS = "logs"  # in RUN_DIR/: live metrics (minitpo.live): TensorBoard event files or the W&B run's files
_ITERATION = re.compile(r"iter-(\d+)")


def eval_path(out: Path, model: str, against: str, suffix: str = ".json") -> Path:
    """RUN_DIR/eval/{model}-vs-{against}.json (the result) or .jsonl (its rows)."""
    return Path(out) / EVAL / f"{model}-vs-{against}{suffix}"


def bench_dir(out: Path, suite: str | None = None) -> Path:
    """RUN_DIR/bench/, or bench/{suite}/ with one suite's per-model files."""
    return Path(out) / BENCH / suite if suite else Path(out) / BENCH


def bench_summary(out: Path, suite: str) -> Path:
    return Path(out) / BENCH / f"{suite}.json"


# one model's files in bench/{suite}/, each named {label}.{name}
BENCH_ANSWERS = "answers.jsonl"  # one row per prompt answered so far: the cache a killed bench goes on from
BENCH_IFEVAL = "ifeval.jsonl"  # ifeval: the scored rows
BENCH_OUTPUTS = "model_outputs.json"  # alpaca_eval: instruction, output, generator (the official evaluator's input)


def bench_judged(judge_fingerprint: str) -> str:
    """The name of a model's judged rows under one judge: p(better than the baseline) per prompt."""
    return f"judged-{judge_fingerprint}.jsonl"


def bench_file(out: Path, suite: str, label: str, name: str) -> Path:
    """RUN_DIR/bench/{suite}/{label}.{name}: model `label`'s file `name` (a BENCH_* name or bench_judged)."""
    return bench_dir(out, suite) / f"{label}.{name}"


def iteration_name(t: int) -> str:
    return f"iter-{t}"


def iteration_dir(out: Path, t: int) -> Path:
    return Path(out) / iteration_name(t)


def iteration_number(name) -> int | None:
    """N for "iter-N", 0 for "seed" (the base model), None for anything else."""
    if name == "seed":
        return 0
    match = _ITERATION.fullmatch(str(name))
    return int(match.group(1)) if match else None


def finished_iterations(out: Path) -> list[int]:
    """The iterations whose summary.json exists, in order."""
    found = (iteration_number(p.parent.name) for p in Path(out).glob(f"iter-*/{SUMMARY}"))
    return sorted(t for t in found if t)


def adapter_dir(out: Path, name: str) -> Path:
    """The adapter folder of model `name` ("iter-N") in run directory `out`."""
    return Path(out) / name / ADAPTER


def has_adapter(folder: Path) -> bool:
    """A complete peft adapter folder (it is written as a whole, adapter_config.json included)."""
    return (Path(folder) / "adapter_config.json").is_file()


KEEP_SPLIT = ("it holds this run's split, which a new one drawn now could break (held-out instructions trained "
              "on): restore it from a copy, or start over with --fresh")


def kept_split(out: Path) -> tuple[list[Instruction], list[list[Instruction]]] | None:
    """(held_out, slices) as the run directory fixed them, None for a new run. A run from before
    split.json has the slices its iterations sampled (iter-N/candidates.jsonl, in order)."""
    out = Path(out)
    if not (out / HELD_OUT).is_file():
        if (out / SPLIT).is_file():  # a new split would not know which instructions were held out
            raise UserError(f"{out / HELD_OUT}: missing, and {SPLIT} is there; {KEEP_SPLIT}")
        return None
    held = read_held_out(out)
    if (out / SPLIT).is_file():
        return held, [[Instruction(**row) for row in s] for s in io.read_json(out / SPLIT, fix=KEEP_SPLIT)["iterations"]]
    slices = []
    while (path := iteration_dir(out, len(slices) + 1) / CANDIDATES).is_file():
        rows = {r["instruction_id"]: Instruction(r["instruction_id"], r["instruction"], r.get("category", ""))
                for r in io.read_jsonl(path)}
        slices.append(list(rows.values()))
    return held, slices


def read_held_out(out: Path) -> list[Instruction]:
    """RUN_DIR/held_out.jsonl as write_split wrote it (none when it is missing)."""
    return [Instruction(**row) for row in io.read_jsonl(Path(out) / HELD_OUT, missing_ok=True, fix=KEEP_SPLIT)]


def write_split(out: Path, held_out: list[Instruction], slices: list[list[Instruction]]) -> None:
    """held_out.jsonl (once: evaluation reads it) and split.json, each iteration's instructions."""
    if not (Path(out) / HELD_OUT).is_file():
        io.write_jsonl(Path(out) / HELD_OUT, [asdict(i) for i in held_out])
    io.write_json(Path(out) / SPLIT, {"iterations": [[asdict(i) for i in s] for s in slices]})


@dataclass(frozen=True)
class Resolved:
    policy: PolicyConfig
    adapter_dir: Path
    template: Template
    system_prompt: bool  # the thought instructions go in the system prompt (recipe's thought.system_prompt)
    sampling: SamplingConfig  # the recipe's, or the defaults for a bare adapter


def resolve_adapter(path: str | Path, template: str | None = None) -> Resolved:
    """The settings to load and prompt the model of PATH. `template` (a named template) overrides the
    recipe's. An adapter folder inside a run (`RUN_DIR/iter-N/adapter`) reads the run's recipe too."""
    path = Path(path)
    if has_adapter(path):
        adapter = path
        recipe_path = path.parent.parent / RECIPE if path.name == ADAPTER else None
    elif has_adapter(path / ADAPTER):
        adapter, recipe_path = path / ADAPTER, path.parent / RECIPE
        if not recipe_path.is_file():
            raise UserError(
                f"PATH: {str(path)!r} looks like an iteration folder but {str(recipe_path)!r} does not exist; "
                f"give the adapter folder {str(adapter)!r} instead (its base model is read from adapter_config.json)"
            )
    else:
        raise UserError(_not_an_adapter(path))

    if recipe_path is not None and recipe_path.is_file():
        from minitpo.recipe import load_recipe  # recipe.py imports the judges; keep this module light

        recipe = load_recipe(recipe_path, check_files=False)  # the run wrote absolute paths into it
        thought = recipe.thought
        return Resolved(policy=recipe.policy, adapter_dir=adapter,
                        template=load_template(replace(thought, template=template) if template else thought),
                        system_prompt=thought.system_prompt, sampling=recipe.sampling)

    config = read_json(adapter / "adapter_config.json", fix="the adapter folder is damaged; give another iteration or adapter")
    base = config.get("base_model_name_or_path")
    if not base:
        raise UserError(
            f"PATH: {str(adapter / 'adapter_config.json')!r} names no base_model_name_or_path; "
            "add the base model's folder or Hub id there, or give the adapter's iteration folder (RUN_DIR/iter-N)"
        )
    # A bare adapter carries no recipe: load its base in full precision, the portable choice.
    return Resolved(policy=PolicyConfig(model=base, quantization="none"), adapter_dir=adapter,
                    template=load_template(ThoughtConfig(template=template or "generic")), system_prompt=False,
                    sampling=SamplingConfig())


def _not_an_adapter(path: Path) -> str:
    if not path.exists():
        return f"PATH: {str(path)!r} does not exist; give an iteration folder (RUN_DIR/iter-N) or an adapter folder"
    trained = sorted(t for p in path.glob("iter-*") if (t := iteration_number(p.name)) and has_adapter(p / ADAPTER))
    if (path / RECIPE).is_file() and trained:
        return (f"PATH: {str(path)!r} is a run directory; give one of its iterations, "
                f"e.g. {str(iteration_dir(path, trained[-1]))!r}")
    if iteration_number(path.name):
        return (f"PATH: {str(path)!r} has no adapter/adapter_config.json: this iteration has not finished "
                "training; run `minitpo run` again to finish it, or give an earlier iteration")
    return (f"PATH: {str(path)!r} holds no adapter_config.json; give an iteration folder (RUN_DIR/iter-N) "
            "or a peft adapter folder")


# Which stage first reads a recipe key (a section, or section.key): a resumed run may change a key until
# that stage's output exists in some iteration. policy and data define the run (its model, its split):
# they never change. iterations, out, evaluate and log may always change.
READ_BY = {"thought": CANDIDATES, "sampling": CANDIDATES, "judge": SCORES, "train.max_length": PAIRS,
           "train.batch_size": PAIRS, "train.logps_chunk": PAIRS, "train.autocast": PAIRS, "train": TRAIN_SUMMARY}
FREE = ("iterations", "out", "evaluate", "log")
STAGE_OF = {CANDIDATES: "sample", SCORES: "judge", PAIRS: "pair", TRAIN_SUMMARY: "train"}


def _flat(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    flat = {}
    for k, v in d.items():
        flat.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return flat


def claim(out: Path, resolved: dict) -> list[str]:
    """Write recipe.yaml and the marker, or check a resumed run's recipe: a changed key is taken when no
    iteration has run the stage that reads it (a setting fixed after it failed a run), else refused in
    one line. Returns the changed keys taken. Call it with the lock held, after check_out."""
    path = Path(out) / RECIPE
    if not path.exists():
        mark(out)  # first: from its first file on, the directory is minitpo's
        io.write_text(path, yaml.safe_dump(resolved, sort_keys=False))
        return []
    from minitpo.recipe import resolved_as_now  # recipe.py imports the judges; keep this module light

    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    before, now = _flat(raw), _flat(resolved)
    # A key missing from the run's recipe.yaml came to minitpo after the run was written (a new setting, a
    # default now resolved in the schema): it is not a change, a run from an older minitpo resumes, and
    # its recipe.yaml gains the key with the value the rest of the run uses. A null or auto that the schema
    # now resolves is compared as it resolves (older recipe.yaml files hold them unresolved).
    then = _flat(resolved_as_now(raw) or raw)
    changed = sorted(k for k in before if then.get(k, before[k]) != now.get(k) and k.split(".")[0] not in FREE)
    for key in changed:
        section = key.split(".")[0]
        stage_file = READ_BY.get(key, READ_BY.get(section))
        ran = sorted(Path(out).glob(f"iter-*/{stage_file}")) if stage_file else []
        if stage_file is None or ran:
            reason = (f"{ran[0].parent.name} ran its {STAGE_OF[stage_file]} stage with the old value" if ran else
                      "the policy and the data define a run")
            raise UserError(f"out: {str(out)!r} holds a run of a different recipe ({key} differs, and {reason}); "
                            "pass --fresh to start over or --out to use another directory")
    if any(k.startswith("judge.") for k in changed):  # the old judge's work that no stage finished goes
        for stale in [Path(out) / JUDGE_CHECK, Path(out) / JUDGE_PROMPT, *Path(out).glob(f"iter-*/{JUDGE_CACHE}")]:
            stale.unlink(missing_ok=True)
    mark(out)  # a run from before the marker, its recipe now checked
    if before != now:
        io.write_text(path, yaml.safe_dump(resolved, sort_keys=False))
    return changed


@contextmanager
def lock(out: Path):
    """Hold RUN_DIR's lock for the duration of the block, or raise UserError when another process does."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(f"out: {str(out)!r} is in use by another minitpo run (pid {holder}); wait for it to "
                        "finish or stop it, or pass --out to use another directory") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the flock


def is_run_dir(out: Path) -> bool:
    """minitpo wrote this folder: it has the marker, or it is a run from before the marker."""
    out = Path(out)
    return (out / MARKER).is_file() or ((out / RECIPE).is_file() and (out / HELD_OUT).is_file())


def _others(out: Path) -> list[str]:
    """The names in `out` that are not minitpo's lock or marker."""
    return sorted(e.name for e in Path(out).iterdir() if e.name not in (LOCK, MARKER))


def check_out(out: Path, fresh: bool) -> None:
    """Refuse, in one line, to delete (--fresh) or to write into a folder of files minitpo did not write.
    A new or empty folder, and a run directory, pass."""
    out = Path(out)
    if not out.is_dir() or is_run_dir(out) or not (others := _others(out)):
        return
    shown = ", ".join(repr(n) for n in others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
    if fresh:
        raise UserError(f"out: {str(out)!r} is not a run directory minitpo made (it holds {shown}) and --fresh "
                        "deletes only those; give another --out, or delete the folder yourself")
    if not (out / RECIPE).is_file():  # a run with only its recipe written yet is checked by the loop
        raise UserError(f"out: {str(out)!r} holds files minitpo did not write ({shown}); give a new or empty "
                        "directory with --out")


def mark(out: Path) -> None:
    """Mark RUN_DIR as minitpo's (once): what lets a later --fresh delete it."""
    if not (Path(out) / MARKER).is_file():
        io.write_text(Path(out) / MARKER, "A minitpo run directory: `minitpo run --fresh` may delete it.\n")


def clear(out: Path) -> None:
    """Delete everything in RUN_DIR but its lock (--fresh), only if minitpo wrote it (check_out). Call it
    with the lock held."""
    check_out(out, fresh=True)
    for entry in Path(out).iterdir():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def remove_stale_temps(out: Path) -> int:
    """Remove the temporary siblings (.NAME.*.tmp, files or folders) that minitpo.io leaves when a
    process is killed mid-write; return how many. Call it with the lock held: nobody else is writing."""
    n = 0
    for tmp in sorted(Path(out).rglob(".*.tmp"), key=lambda p: len(p.parts)):  # outer ones first
        if not tmp.exists():
            continue  # inside a temporary folder removed just before
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        n += 1
    return n
