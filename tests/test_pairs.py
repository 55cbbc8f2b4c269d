"""Length control and pair selection (minitpo/pairs.py), on hand-computed numbers."""

import math

import pytest

from minitpo.pairs import build_pairs, control_length, length_controlled_scores, normalise
from minitpo.sample import Candidate


def cand(iid, k, response, parsed=True, truncated=False):
    return Candidate(instruction_id=iid, instruction=f"q{iid}", prompt=f"P{iid}", index=k,
                     text=f"t{k} <R> {response}", thought=f"t{k}", response=response if parsed else "",
                     parsed=parsed, n_tokens=5, truncated=truncated)


def test_length_control_by_hand():
    # scores [2, 4, 6]: mean 4, population std sqrt(8/3) = 1.63299 -> [-1.22474, 0, 1.22474]
    # lengths [10, 20, 60]: mean 30, std sqrt((400 + 100 + 900) / 3) = 21.60247 -> [-0.92582, -0.46291, 1.38873]
    s = length_controlled_scores([2, 4, 6], [10, 20, 60], rho=0.5)
    assert s == pytest.approx([-1.22474 + 0.46291, 0 + 0.23146, 1.22474 - 0.69437], abs=1e-4)
    assert length_controlled_scores([2, 4, 6], [10, 20, 60], rho=0.0) == pytest.approx([-1.22474, 0, 1.22474], abs=1e-4)


def test_normalise_constant_values_gives_zeros():
    assert normalise([3.0, 3.0, 3.0]) == [0.0, 0.0, 0.0]


def test_rho_flips_the_choice_towards_the_shorter_response():
    # The longest response has the best raw score; with strong length control the middle one wins.
    cands = [cand(0, 0, "x" * 10), cand(0, 1, "x" * 20), cand(0, 2, "x" * 60)]
    raw = {(0, 0): 2.0, (0, 1): 5.9, (0, 2): 6.0}
    (p0,) = build_pairs(cands, raw, control_length(cands, raw, rho=0.0))
    assert (p0.chosen_index, p0.rejected_index) == (2, 0)
    (p5,) = build_pairs(cands, raw, control_length(cands, raw, rho=0.5))
    assert p5.chosen_index == 1


def test_parse_failures_serve_as_rejected():
    cands = [cand(0, 0, "a"), cand(0, 1, "bb"), cand(0, 2, "", parsed=False, truncated=True), cand(0, 3, "", parsed=False)]
    raw = {(0, 0): 1.0, (0, 1): 3.0}
    (p,) = build_pairs(cands, raw, control_length(cands, raw, 0.0))
    assert p.chosen_index == 1 and p.rejected_index == 2  # lowest-index failure
    assert not p.rejected_parsed and p.rejected_truncated and p.rejected_score is None


def test_a_forced_chosen_is_rejected_against_its_own_first_pass():
    """The chosen candidate's marker was forced: its rejected side is what the model wrote before the
    marker was appended, not another candidate; when the chosen wrote its marker itself, the usual
    rule holds (a failure, else the worst)."""
    import dataclasses

    forced = dataclasses.replace(cand(0, 1, "best"), forced=True, unforced_text="t1 and on", unforced_truncated=True)
    cands = [cand(0, 0, "a"), forced, cand(0, 2, "", parsed=False)]
    raw = {(0, 0): 2.0, (0, 1): 9.0}
    (p,) = build_pairs(cands, raw, control_length(cands, raw, rho=0.0))
    assert (p.chosen, p.rejected) == (forced.text, "t1 and on")
    assert (p.chosen_index, p.rejected_index, p.rejected_parsed, p.rejected_truncated) == (1, 1, False, True)
    assert p.rejected_score is None
    raw = {(0, 0): 9.0, (0, 1): 2.0}  # the natural one wins: rejected is the parse failure
    (p,) = build_pairs(cands, raw, control_length(cands, raw, rho=0.0))
    assert (p.chosen_index, p.rejected_index, p.rejected_truncated) == (0, 2, False)


def test_single_parsed_candidate_pairs_with_a_failure():
    cands = [cand(0, 0, "only"), cand(0, 1, "", parsed=False)]
    raw = {(0, 0): 4.0}
    (p,) = build_pairs(cands, raw, control_length(cands, raw, 0.3))
    assert (p.chosen_index, p.rejected_index) == (0, 1)


def test_no_pair_without_parsed_candidates_or_with_ties():
    failures = [cand(0, 0, "", parsed=False), cand(0, 1, "", parsed=False)]
    ties = [cand(1, 0, "short"), cand(1, 1, "much longer response")]
    raw = {(1, 0): 5.0, (1, 1): 5.0}
    # rho > 0 would separate the tie by length alone: the judge still expressed no preference.
    assert build_pairs(failures + ties, raw, control_length(failures + ties, raw, rho=0.5)) == []


def test_min_chosen_keeps_a_non_answer_off_the_chosen_side():
    """Instruction 0: its only parsed response scored 0 (a rule judge's "no answer"), its siblings failed to
    parse. Without a floor the 0 is chosen against a failure; with min_chosen 1 there is no pair. Instruction
    1: the best (9) is chosen either way, and the 0 may still be the rejected side. Instruction 2: the best
    response is a forced one that scored 0, the other scored 3: with the floor the 3 is chosen, against the
    failure, not the forced response's own first pass."""
    import dataclasses

    forced = dataclasses.replace(cand(2, 0, "</"), forced=True, unforced_text="t0 more")
    cands = [cand(0, 0, "</"), cand(0, 1, "", parsed=False),
             cand(1, 0, "good"), cand(1, 1, "</"),
             forced, cand(2, 1, "fine"), cand(2, 2, "", parsed=False)]
    raw = {(0, 0): 0.0, (1, 0): 9.0, (1, 1): 0.0, (2, 0): 0.0, (2, 1): 3.0}
    final = {(2, 0): 5.0, (2, 1): 1.0, **{k: v for k, v in raw.items() if k[0] != 2}}  # the 0 ranked first
    no_floor = build_pairs(cands, raw, final)
    assert [(p.instruction_id, p.chosen_index, p.rejected_index) for p in no_floor] == [(0, 0, 1), (1, 0, 1), (2, 0, 0)]
    floored = build_pairs(cands, raw, final, min_chosen=1.0)
    assert [(p.instruction_id, p.chosen_index, p.rejected_index) for p in floored] == [(1, 0, 1), (2, 1, 2)]
    assert floored[1].rejected == "t2 <R> " and not floored[1].rejected_parsed


def test_pairs_per_instruction_and_prompt_kept():
    cands = [cand(0, 0, "a"), cand(0, 1, "b"), cand(1, 0, "c"), cand(1, 1, "d")]
    raw = {(0, 0): 1.0, (0, 1): 2.0, (1, 0): 9.0, (1, 1): 3.0}
    pairs = build_pairs(cands, raw, control_length(cands, raw, 0.0))
    assert [(p.instruction_id, p.chosen_index, p.rejected_index) for p in pairs] == [(0, 1, 0), (1, 0, 1)]
    assert pairs[0].prompt == "P0" and pairs[0].chosen == "t1 <R> b"  # full output, thought included
    assert math.isclose(pairs[1].chosen_score, 1.0) and math.isclose(pairs[1].rejected_score, -1.0)


def test_auto_rho_picks_the_smallest_rho_that_stops_favouring_length():
    from minitpo.pairs import RHO_GRID, auto_rho, pair_lengths

    # Instruction 0: the judge prefers the longest response a little (5.0 vs 4.8 vs 1.0).
    # Instruction 1: no length bias (the short one wins). Lengths are in characters.
    cands = [cand(0, 0, "x" * 10), cand(0, 1, "x" * 12), cand(0, 2, "x" * 100),
             cand(1, 0, "y" * 10), cand(1, 1, "y" * 40)]
    raw = {(0, 0): 1.0, (0, 1): 4.8, (0, 2): 5.0, (1, 0): 6.0, (1, 1): 2.0}
    # rho = 0: chosen lengths [100, 10] vs rejected [10, 40] -> mean 55 > 25: too long.
    # Instruction 0 by hand: scores [1, 4.8, 5] have mean 3.6, std 1.8403 -> z = [-1.4128, 0.6521, 0.7607];
    # lengths [10, 12, 100] have mean 40.667, std 41.963 -> z = [-0.7308, -0.6831, 1.4139].
    # s_1 - s_2 = -0.1086 + rho * 2.0970 > 0 once rho > 0.0518: on the grid, 0.05 still picks the
    # 100-char response and 0.1 picks the 12-char one: chosen [12, 10] vs rejected [10, 40] -> 11 <= 25.
    assert auto_rho(cands, raw) == 0.1
    chosen, rejected = pair_lengths(cands, build_pairs(cands, raw, control_length(cands, raw, 0.05)))
    assert chosen == [100, 10] and rejected == [10, 40]
    chosen, rejected = pair_lengths(cands, build_pairs(cands, raw, control_length(cands, raw, 0.1)))
    assert chosen == [12, 10] and rejected == [10, 40]
    unbiased = {(0, 0): 5.0, (0, 1): 4.8, (0, 2): 1.0, (1, 0): 6.0, (1, 1): 2.0}
    assert auto_rho(cands, unbiased) == 0.0
    assert RHO_GRID[0] == 0.0 and RHO_GRID[-1] == 0.5
