"""The python judge (judge.type python): the one documented hook for user code,
`f(instruction, response) -> float`, named in the recipe as "module:callable" or "path/to/file.py:callable".

Consumes a `JudgeConfig` and parallel lists of instructions and responses; produces one
dict(score, score_mass=None) per response. minitpo.recipe imports the function when the recipe loads,
so a wrong name fails before any model does.
"""

import importlib
import importlib.util
import math
import numbers
from pathlib import Path

from tqdm import tqdm

from minitpo.errors import UserError


def load_python_judge(function: str):
    """`module:callable` (an importable module) or `path/to/file.py:callable`."""
    where, sep, name = function.rpartition(":")
    if not sep or not where or not name:
        raise UserError(f'judge.function: {function!r} is not "module:callable" or "path/to/file.py:callable"; '
                        "name the module or file and the function")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise UserError(f"judge.function: {path} does not exist; give the path of your judge's .py file")
        spec = importlib.util.spec_from_file_location(f"minitpo_user_judge_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            if e.name is None or not (where == e.name or where.startswith(e.name + ".")):
                raise  # the module exists but one of its own imports failed: show the real traceback
            raise UserError(f"judge.function: module {where!r} cannot be imported; check the name "
                            "or give a path to a .py file") from None
    f = getattr(module, name, None)
    if not callable(f):
        raise UserError(f"judge.function: {where} has no callable {name!r}; define {name}(instruction, response)")
    return f


class PartialScores(Exception):
    """The user's function raised (the cause): `results` holds the scores it gave before, for the cache."""

    def __init__(self, results: list[dict]):
        super().__init__(f"the judge function raised after {len(results)} responses")
        self.results = results


def score_responses(cfg, instructions: list[str], responses: list[str], progress: bool = True) -> list[dict]:
    """One dict(score, score_mass=None) per (instruction, response)."""
    assert len(instructions) == len(responses), f"{len(instructions)} instructions, {len(responses)} responses"
    f = load_python_judge(cfg.function)
    results = []
    bar = tqdm(total=len(responses), desc="judge", unit="resp", disable=not progress or not responses)
    for instruction, response in zip(instructions, responses):
        try:
            value = f(instruction, response)
        except Exception as e:  # the user's code failed: the scores made so far go to the judge cache
            bar.close()
            raise PartialScores(results) from e
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        if not ok:
            raise UserError(f"judge.function: {cfg.function} returned {value!r}; it must return a finite "
                            "number (int or float) for every response")
        results.append({"score": float(value), "score_mass": None})
        bar.update(1)
    bar.close()
    return results
