"""The split: held-out first, then disjoint slices; repeats dropped; a run's split kept across resumes."""

import pytest

from minitpo.data import Instruction, drop_duplicates, split_instructions
from minitpo.errors import UserError


def _items(texts):
    return [Instruction(id=i, text=t) for i, t in enumerate(texts)]


def test_repeats_are_dropped_whatever_their_case_and_spacing():
    items, dropped = drop_duplicates(_items(["Say hi.", "say  hi.", "Say bye.", " SAY HI. ", "Say bye."]))
    assert [i.text for i in items] == ["Say hi.", "Say bye."] and dropped == 3


def test_a_kept_split_stays_and_new_slices_avoid_every_held_out_and_used_text():
    items = _items([f"task {n}" for n in range(20)])
    held, slices = split_instructions(items, per_iteration=4, held_out=3, iterations=2, seed=0)
    assert len(held) == 3 and [len(s) for s in slices] == [4, 4]
    taken = [i.text for i in held] + [i.text for s in slices for i in s]
    assert len(set(taken)) == 11

    # The file changed: new lines in front (every id shifts, the shuffle differs) and one line dropped.
    grown = _items([f"new {n}" for n in range(5)] + [f"task {n}" for n in range(1, 20)])
    held2, slices2 = split_instructions(grown, per_iteration=4, held_out=3, iterations=4, seed=0, kept=(held, slices))
    assert held2 == held and slices2[:2] == slices
    new = {i.text for s in slices2[2:] for i in s}
    assert len(new) == 8 and not new & set(taken)


def test_too_few_fresh_instructions_for_more_iterations_is_one_line():
    items = _items([f"task {n}" for n in range(10)])
    kept = split_instructions(items, per_iteration=4, held_out=2, iterations=2, seed=0)
    with pytest.raises(UserError, match="0 instructions are neither held out nor used by this run's 2 iterations, "
                                        "but 1 more iterations need 4"):
        split_instructions(items, per_iteration=4, held_out=2, iterations=3, seed=0, kept=kept)
