"""The judges' dispatch and cache (minitpo/judges/__init__.py): a resumed judge stage never judges a response twice."""

from minitpo.config import JudgeConfig
from minitpo.sample import Candidate
from minitpo.judges import score_candidates

JUDGE = '''
def score(instruction, response):
    with open({log!r}, "a") as f:
        f.write(response + "\\n")
    return float(len(response))
'''


def cand(iid, k, response):
    return Candidate(instruction_id=iid, instruction=f"q{iid}", prompt="p", index=k, text=response,
                     thought="", response=response, parsed=True, n_tokens=3, truncated=False)


def test_cache_skips_judged_responses_and_duplicates(tmp_path):
    log = tmp_path / "calls.txt"
    (tmp_path / "judge.py").write_text(JUDGE.format(log=str(log)))
    cfg = JudgeConfig(type="python", function=f"{tmp_path / 'judge.py'}:score")
    cache = tmp_path / "judge_cache.jsonl"
    first = [cand(0, 0, "aa"), cand(0, 1, "aa"), cand(0, 2, "bbbb"), cand(1, 0, "aa")]
    scores, stats = score_candidates(cfg, first, cache)
    assert scores == [2.0, 2.0, 4.0, 2.0]
    assert stats == {"judged": 3, "cached": 1, "verdict_mass": None, "responses_cut": 0, "unjudged": 0}  # the repeated ("q0", "aa") is judged once
    assert log.read_text().split() == ["aa", "bbbb", "aa"]
    # A resumed stage (or a later call) with one new response judges only that one.
    scores, stats = score_candidates(cfg, first + [cand(1, 1, "ccc")], cache)
    assert scores[-1] == 3.0 and stats == {"judged": 1, "cached": 4, "verdict_mass": None, "responses_cut": 0, "unjudged": 0}
    assert log.read_text().split() == ["aa", "bbbb", "aa", "ccc"]
