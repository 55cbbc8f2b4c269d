"""Length control and chosen/rejected selection (docs/method.md steps 5 and 6).

Consumes, per instruction, its K candidates with their raw judge scores. Produces at most one `Pair`
per instruction: chosen = the best length-controlled score, rejected = a parse failure when there is
one, else the worst score. Pure functions: no model, no I/O.
"""

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Pair:
    instruction_id: int
    prompt: str
    chosen: str  # full output text: thought + marker + response
    rejected: str
    chosen_score: float  # length-controlled score s_i
    rejected_score: float | None  # None when the rejected side is a parse failure
    chosen_index: int
    rejected_index: int
    rejected_parsed: bool
    rejected_truncated: bool  # no EOS is appended to a truncated output when training

    @classmethod
    def from_row(cls, row: dict) -> "Pair":
        """The pair of one pairs.jsonl row (which also holds the reference log-probs and flags)."""
        return cls(**{k: row[k] for k in cls.__dataclass_fields__})


def normalise(values: list[float]) -> list[float]:
    """Zero mean, unit (population) std; all zeros when every value is the same."""
    mean = statistics.fmean(values)
    std = statistics.pstdev(values)
    return [0.0 if std == 0 else (v - mean) / std for v in values]


def length_controlled_scores(scores: list[float], lengths: list[float], rho: float) -> list[float]:
    """s_i = norm(score)_i - rho * norm(length)_i over one instruction's parsed responses (docs/method.md step 5).

    Example: scores [2, 4, 6] and lengths [10, 20, 60] normalise to [-1.22, 0, 1.22] and
    [-0.93, -0.46, 1.39]; with rho = 0.5, s = [-0.76, 0.23, 0.53]."""
    return [s - rho * length for s, length in zip(normalise(scores), normalise(lengths))]


def control_length(candidates, raw: dict[tuple[int, int], float], rho: float) -> dict[tuple[int, int], float]:
    """Length-controlled score s_i for every parsed candidate, normalised within its instruction.
    Keys are (instruction_id, candidate index); response length is counted in characters."""
    final = {}
    for group in by_instruction(candidates):
        parsed = [c for c in group if c.parsed]
        if parsed:
            keys = [(c.instruction_id, c.index) for c in parsed]
            s = length_controlled_scores([raw[k] for k in keys], [len(c.response) for c in parsed], rho)
            final.update(zip(keys, s))
    return final


def build_pairs(candidates, raw: dict[tuple[int, int], float], final: dict[tuple[int, int], float],
                min_chosen: float | None = None) -> list[Pair]:
    """One pair per instruction that has a preference.

    `raw` and `final` map (instruction_id, candidate index) -> the judge's score and the
    length-controlled score, for parsed candidates. A parse failure ranks below every parsed
    candidate, so it becomes the rejected side when present. When the chosen candidate's marker was
    forced (sampling.force_marker), its own first pass, which the model wrote without the marker, is
    that failure: the two share every token up to where the marker was appended, so DPO's preference
    falls on writing the marker there (and on the response after it), not on a different text.
    Otherwise the lowest-index failure, for determinism. No pair when no candidate parsed, or when
    the judge gave every parsed candidate the same score and there is no failure to reject.

    `min_chosen` (judge.min_chosen): a response the judge scored below it is never chosen, though it may
    be rejected. Without it, a response the judge rates as no answer at all (a rule judge's 0 for an empty
    or two-word reply) is chosen whenever its siblings failed to parse, and DPO trains the model to write it."""
    pairs = []
    for group in by_instruction(candidates):
        parsed = [c for c in group if c.parsed]
        failed = [c for c in group if not c.parsed]
        if not parsed:
            continue
        keys = [(c.instruction_id, c.index) for c in parsed]
        s, r = [final[k] for k in keys], [raw[k] for k in keys]
        eligible = [j for j in range(len(parsed)) if min_chosen is None or r[j] >= min_chosen]
        if not eligible:
            continue  # nothing the judge would call an answer: no side to prefer
        best = max(eligible, key=lambda j: (s[j], -j))
        chosen = parsed[best]
        if chosen.forced and chosen.unforced_text:
            pairs.append(Pair(
                instruction_id=chosen.instruction_id, prompt=chosen.prompt, chosen=chosen.text,
                rejected=chosen.unforced_text, chosen_score=s[best], rejected_score=None,
                chosen_index=chosen.index, rejected_index=chosen.index, rejected_parsed=False,
                rejected_truncated=chosen.unforced_truncated,
            ))
            continue
        if failed:
            rejected, rejected_score = failed[0], None
        elif max(r) - min(r) <= 1e-9 or max(s) == min(s):
            continue  # a tie: the judge expressed no preference
        else:
            worst = min(range(len(parsed)), key=lambda j: (s[j], j))
            rejected, rejected_score = parsed[worst], s[worst]
        pairs.append(Pair(
            instruction_id=chosen.instruction_id, prompt=chosen.prompt, chosen=chosen.text,
            rejected=rejected.text, chosen_score=s[best], rejected_score=rejected_score,
            chosen_index=chosen.index, rejected_index=rejected.index,
            rejected_parsed=rejected.parsed, rejected_truncated=rejected.truncated,
        ))
    return pairs


RHO_GRID = [i / 20 for i in range(11)]  # 0, 0.05, ..., 0.5: the paper's range


def auto_rho(candidates, raw: dict[tuple[int, int], float], min_chosen: float | None = None) -> float:
    """The smallest rho on RHO_GRID for which the mean chosen response is not longer than the mean
    rejected one (how the paper tunes it, docs/method.md step 5); 0.5 when none is. Only pairs whose rejected
    side parsed have a response length to compare; with none, rho = 0."""
    for rho in RHO_GRID:
        chosen, rejected = pair_lengths(candidates, build_pairs(candidates, raw, control_length(candidates, raw, rho), min_chosen))
        if not chosen or statistics.fmean(chosen) <= statistics.fmean(rejected):
            return rho
    return RHO_GRID[-1]


def pair_lengths(candidates, pairs) -> tuple[list[int], list[int]]:
    """Response lengths (characters) of chosen and rejected sides, over pairs whose rejected parsed."""
    length = {(c.instruction_id, c.index): len(c.response) for c in candidates}
    kept = [p for p in pairs if p.rejected_parsed]
    return ([length[(p.instruction_id, p.chosen_index)] for p in kept],
            [length[(p.instruction_id, p.rejected_index)] for p in kept])


def judged(candidates, raw: dict[tuple[int, int], float]) -> list:
    """The candidates that take part in pairs: every parse failure, and every parsed one the judge scored
    (an unjudged response is neither chosen nor rejected: its text may be fine, the judge said nothing)."""
    return [c for c in candidates if not c.parsed or (c.instruction_id, c.index) in raw]


def by_instruction(candidates) -> list[list]:
    """The candidates grouped by instruction, in the order the instructions first appear."""
    groups: dict[int, list] = {}
    for c in candidates:
        groups.setdefault(c.instruction_id, []).append(c)
    return list(groups.values())
