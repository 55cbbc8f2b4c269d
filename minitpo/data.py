"""Instructions: read the file, shuffle once with the data seed, and slice it.

Consumes `data.instructions` (.jsonl with "instruction" and optional "category", or .txt with one
instruction per line). Produces `Instruction`s: the held-out set first, then one fresh, disjoint slice
per iteration, so no instruction is trained on twice and held-out ones never are (docs/method.md step 1).
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


def load_instructions(path: str | Path) -> list[Instruction]:
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"data.instructions: {path} line {line} is not UTF-8 text; give a .jsonl or .txt file "
                        "saved as UTF-8") from None
    items = []
    for i, line in enumerate(text.splitlines()):
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
    return items


def split_instructions(items, per_iteration: int, held_out: int, iterations: int, seed: int):
    """(held_out, [slice for iteration 1, slice for iteration 2, ...]), disjoint, from one seeded
    shuffle. Fails, before any model loads, when the file is too small for the recipe."""
    need = held_out + per_iteration * iterations
    if need > len(items):
        raise UserError(
            f"data.instructions: {len(items)} instructions, but the recipe needs {need} "
            f"(held_out {held_out} + per_iteration {per_iteration} x {iterations} iterations); "
            "add instructions or lower data.per_iteration"
        )
    order = list(items)
    random.Random(seed).shuffle(order)
    slices = [order[held_out + t * per_iteration: held_out + (t + 1) * per_iteration] for t in range(iterations)]
    return order[:held_out], slices
