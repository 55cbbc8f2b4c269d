"""Tests for minitpo/judges/python.py: the user's own judge function, by module or by file."""

import textwrap

import pytest

from minitpo.config import JudgeConfig
from minitpo.errors import UserError
from minitpo.judges import python as judge


def Cfg(**fields) -> JudgeConfig:
    return JudgeConfig(**{"type": "python", **fields})


def _scores(cfg, instructions, responses, progress=False) -> list[float]:
    return [r["score"] for r in judge.score_responses(cfg, instructions, responses, progress)]


@pytest.fixture
def judge_module(tmp_path, monkeypatch):
    (tmp_path / "my_judge.py").write_text(textwrap.dedent("""
        def by_length(instruction, response):
            return len(response)

        def bad(instruction, response):
            return {"score": 1} if response == "x" else float("nan")
        """), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path / "my_judge.py"


def test_python_judge_module_and_file(judge_module):
    for function in ("my_judge:by_length", f"{judge_module}:by_length"):
        cfg = Cfg(type="python", function=function)
        assert _scores(cfg, ["q", "q"], ["ab", "abcd"], progress=False) == [2.0, 4.0]
        assert judge.score_responses(cfg, ["q"], ["a"], progress=False) == [{"score": 1.0, "score_mass": None}]


@pytest.mark.parametrize("response, shown", [("x", "{'score': 1}"), ("y", "nan")])
def test_python_judge_bad_return_is_a_user_error(judge_module, response, shown):
    with pytest.raises(UserError, match=rf"judge.function: my_judge:bad returned {shown}"):
        _scores(Cfg(type="python", function="my_judge:bad"), ["q"], [response], progress=False)


@pytest.mark.parametrize("function", ["no_such_module_xyz:f", "my_judge:missing", "nocolon", "/no/such/file.py:f"])
def test_python_judge_bad_function_is_a_user_error(judge_module, function):
    with pytest.raises(UserError, match="judge.function"):  # "nocolon" is already caught by JudgeConfig
        _scores(Cfg(type="python", function=function), ["q"], ["a"], progress=False)


def test_empty_input_gives_no_scores(judge_module):
    assert _scores(Cfg(function="my_judge:by_length"), [], [], progress=False) == []
