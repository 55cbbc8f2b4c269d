"""Instructions: read them, shuffle once with the data seed, and slice them.

Consumes `data.instructions`: a .jsonl with "instruction" and optional "category", or a .txt with one
instruction per line (read here, line by line), or a dataset read through the `datasets` library: a
.parquet file, a local dataset folder (`save_to_disk` output, or a folder of parquet/json files) or a
Hub dataset id, with `data.split` and `data.column` (a chat column gives its first user turn). Produces `Instruction`s: the held-out set first, then one fresh, disjoint slice
per iteration, so no instruction is trained on twice and held-out ones never are (docs/method.md step 1).

Two things would break that silently, and are closed here: an instruction listed twice (its copies
could land on both sides of the split: `drop_duplicates` keeps the first), and a file edited between
resumes (a new shuffle would move held-out and used instructions into training: the run directory
keeps the split it started with, and `split_instructions(kept=...)` only adds slices, from
instructions in neither part).
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

from minitpo.errors import UserError


@dataclass(frozen=True)
class Instruction:
    id: int  # line number in the file (0-based): stable across runs and shuffles
    text: str
    category: str = ""


def load_instructions(source: str | Path, split: str = "train", column: str | None = None) -> list[Instruction]:
    """Every non-empty instruction of `source`, in its order. A .jsonl or .txt file is read line by line
    (`split` and `column` do not apply); anything else through the `datasets` library (datasource.py)."""
    return _read(source, split, column)[0]


LINE_FILES = (".jsonl", ".txt")  # read line by line, as minitpo always has


def _read(source, split, column) -> tuple[list[Instruction], int]:
    """(the non-empty instructions, how many lines or rows the source has)."""
    path = Path(source)
    if path.is_file() and path.suffix in LINE_FILES:
        return _load_lines(path)
    from minitpo.datasource import load_dataset_column

    texts, categories = load_dataset_column(str(source), split, column)
    items = [Instruction(id=i, text=t.strip(), category=c) for i, (t, c) in enumerate(zip(texts, categories))
             if t.strip()]
    if not items:
        raise UserError(f"data.instructions: {source} split {split!r} holds no instructions in its column; "
                        "pick another data.split or data.column")
    return items, len(texts)


def _load_lines(path: Path) -> tuple[list[Instruction], int]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"data.instructions: {path} line {line} is not UTF-8 text; give a .jsonl or .txt file "
                        "saved as UTF-8") from None
    items, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
                instruction, category = row["instruction"], str(row.get("category", ""))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise UserError(
                    f'data.instructions: {path} line {i + 1} is not a JSON object with an "instruction" '
                    "field; fix that line"
                ) from None
            if not isinstance(instruction, str):
                raise UserError(f'data.instructions: {path} line {i + 1}: "instruction" is '
                                f"{type(instruction).__name__}, not text; make it a string")
        else:
            instruction, category = line, ""
        if "\x00" in instruction:
            raise UserError(f"data.instructions: {path} line {i + 1} holds NUL bytes; is it a binary file? "
                            "give a .jsonl or .txt file of instructions")
        if instruction.strip():
            items.append(Instruction(id=i, text=instruction.strip(), category=category))
    if not items:
        raise UserError(f"data.instructions: {path} holds no instructions; add at least one per line")
    return items, len(lines)


def same_text(text: str) -> str:
    """What two instructions share when they are the same one: case and spacing do not count."""
    return " ".join(text.lower().split())


def drop_duplicates(items: list[Instruction]) -> tuple[list[Instruction], int]:
    """The instructions with every repeat of an earlier one (same_text) dropped, and how many were."""
    seen, unique = set(), []
    for item in items:
        if same_text(item.text) not in seen:
            seen.add(same_text(item.text))
            unique.append(item)
    return unique, len(items) - len(unique)


def read_instructions(data) -> tuple[list[Instruction], list[str]]:
    """`data.instructions` read (`load_instructions`), with repeats and instructions over
    `data.max_chars` dropped; and a line for each kind dropped, to show the user."""
    items, n_rows = _read(data.instructions, data.split, data.column)
    empty = n_rows - len(items)
    items, duplicates = drop_duplicates(items)
    kept = [i for i in items if len(i.text) <= data.max_chars]
    notes = [f"data.instructions: {empty} empty lines or rows dropped"] if empty else []
    if duplicates:
        notes.append(f"data.instructions: {duplicates} repeated instructions dropped (the first of each kept), "
                     "so none is both held out and trained on")
    if len(kept) < len(items):
        notes.append(f"data.instructions: {len(items) - len(kept)} instructions over data.max_chars "
                     f"{data.max_chars} characters skipped; raise data.max_chars to keep them")
    if not kept:
        raise UserError(f"data.instructions: all {len(items)} instructions are over data.max_chars "
                        f"{data.max_chars} characters; raise data.max_chars")
    return kept, notes


def split_instructions(items, per_iteration: int, held_out: int, iterations: int, seed: int, kept=None):
    """(held_out, [slice for iteration 1, slice for iteration 2, ...]), disjoint, from one seeded
    shuffle. `kept` is the (held_out, slices) a run directory already fixed: they stay as they are and
    only the iterations beyond them get slices, from the instructions in neither (so a file that grew
    or changed between resumes never moves a held-out or used instruction into training). Fails,
    before any model loads, when the file is too small for the recipe."""
    order = list(items)
    random.Random(seed).shuffle(order)
    if kept is None:
        kept = (order[:held_out], [])
        order = order[held_out:] if len(order) >= held_out else []
    kept_held, kept_slices = kept
    taken = {same_text(i.text) for i in kept_held} | {same_text(i.text) for s in kept_slices for i in s}
    fresh = [i for i in order if same_text(i.text) not in taken]
    missing = max(iterations - len(kept_slices), 0)
    if per_iteration * missing > len(fresh):  # (a kept held-out set of another size: the recipe check's)
        raise UserError(_too_few(len(items), len(fresh), per_iteration, held_out, iterations, kept_slices))
    slices = [fresh[t * per_iteration:(t + 1) * per_iteration] for t in range(missing)]
    return list(kept_held), list(kept_slices) + slices


def _too_few(n_items, n_fresh, per_iteration, held_out, iterations, kept_slices) -> str:
    if not kept_slices:
        return (f"data.instructions: {n_items} instructions, but the recipe needs {held_out + per_iteration * iterations} "
                f"(held_out {held_out} + per_iteration {per_iteration} x {iterations} iterations); "
                "add instructions or lower data.per_iteration")
    missing = iterations - len(kept_slices)
    return (f"data.instructions: {n_fresh} instructions are neither held out nor used by this run's "
            f"{len(kept_slices)} iterations, but {missing} more iterations need {per_iteration * missing}; "
            "add instructions or lower iterations")
