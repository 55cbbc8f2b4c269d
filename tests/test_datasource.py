"""Instructions from datasets: a .parquet file, a save_to_disk folder, a folder of json files, a Hub id
read offline from a cache laid out as the Hugging Face cache holds it; chat columns, bad ids, splits and
columns; and the tiny recipe run through the real CLI from a parquet file and from a dataset folder.

Fixtures are written with pyarrow and json directly; the reading is the real `datasets` library."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, TINY
from minitpo.config import DataConfig
from minitpo.data import load_instructions, read_instructions
from minitpo.errors import UserError

TINY_ROWS = [json.loads(line) for line in (TINY / "instructions.jsonl").read_text().splitlines()]
SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """datasets writes its arrow cache under HF_DATASETS_CACHE: keep it in the test's folder."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")


def _parquet(path, columns):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def test_a_parquet_file_gives_its_prompt_column_by_default_and_ids_are_row_numbers(tmp_path):
    path = _parquet(tmp_path / "p.parquet", {"id": [1, 2, 3], "prompt": ["Say hi.", "", " Say bye. "]})
    items = load_instructions(path)
    assert [(i.id, i.text) for i in items] == [(0, "Say hi."), (2, "Say bye.")]


def test_instruction_is_preferred_to_prompt_and_an_explicit_column_wins(tmp_path):
    path = _parquet(tmp_path / "p.parquet", {"prompt": ["p0", "p1"], "instruction": ["i0", "i1"], "q": ["q0", "q1"],
                                             "category": ["math", None]})
    assert [(i.text, i.category) for i in load_instructions(path)] == [("i0", "math"), ("i1", "")]
    assert [i.text for i in load_instructions(path, column="q")] == ["q0", "q1"]


def test_a_chat_column_gives_the_first_user_turn_openai_and_sharegpt(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "First?"},
                          {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Second?"}]},
            {"messages": [{"role": "assistant", "content": "No user here."}]}]
    (tmp_path / "chat").mkdir()
    (tmp_path / "chat" / "train.json").write_text("\n".join(json.dumps(r) for r in rows))
    assert [(i.id, i.text) for i in load_instructions(tmp_path / "chat")] == [(0, "First?")]
    share = [{"conversations": [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hi."}]}]
    (tmp_path / "sharegpt").mkdir()
    (tmp_path / "sharegpt" / "train.json").write_text(json.dumps(share[0]))
    assert [i.text for i in load_instructions(tmp_path / "sharegpt")] == ["Hello?"]


def test_a_save_to_disk_folder_with_splits(tmp_path):
    import datasets

    _parquet(tmp_path / "src" / "a.parquet", {"instruction": ["tr0", "tr1"]})
    _parquet(tmp_path / "src" / "b.parquet", {"instruction": ["te0"]})
    train = datasets.load_dataset("parquet", data_files=str(tmp_path / "src" / "a.parquet"), split="train")
    test = datasets.load_dataset("parquet", data_files=str(tmp_path / "src" / "b.parquet"), split="train")
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "saved"))
    assert [i.text for i in load_instructions(tmp_path / "saved")] == ["tr0", "tr1"]
    assert [i.text for i in load_instructions(tmp_path / "saved", split="test")] == ["te0"]
    with pytest.raises(UserError, match=r"^data.split: 'dev' is not a split of .*saved \(it has train, test\)"):
        load_instructions(tmp_path / "saved", split="dev")


def test_bad_column_and_no_known_column_are_one_line(tmp_path):
    path = _parquet(tmp_path / "p.parquet", {"text": ["a"], "n": [1]})
    with pytest.raises(UserError, match=r"^data.column: .*p.parquet has none of the columns instruction, prompt, "
                                        r"messages, conversations \(it has text, n\); set data.column"):
        load_instructions(path)
    with pytest.raises(UserError, match=r"^data.column: 'txt' is not a column of .*\(it has text, n\)"):
        load_instructions(path, column="txt")
    with pytest.raises(UserError, match=r"^data.column: 'n' holds int values, not text"):
        load_instructions(path, column="n")


def _hub_cache(home, repo="someorg--prompts"):
    """A Hub dataset as huggingface_hub's cache holds it: refs/main names a snapshot folder of the repo's files."""
    base = home / "hub" / f"datasets--{repo}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(SHA)
    _parquet(base / "snapshots" / SHA / "data" / "train_prefs-00000-of-00001.parquet",
             {"prompt": ["Name a fruit.", "Name a tree.", "name a  FRUIT."], "prompt_id": ["a", "b", "c"]})
    _parquet(base / "snapshots" / SHA / "data" / "test_prefs-00000-of-00001.parquet", {"prompt": ["Held."], "prompt_id": ["d"]})


def _offline(monkeypatch, home):
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))


def test_a_hub_id_is_read_offline_from_the_hugging_face_cache(tmp_path, monkeypatch):
    _hub_cache(tmp_path / "hf")
    _offline(monkeypatch, tmp_path / "hf")
    items, notes = read_instructions(DataConfig(instructions="someorg/prompts", split="train_prefs"))
    assert [i.text for i in items] == ["Name a fruit.", "Name a tree."]
    assert notes == ["data.instructions: 1 repeated instructions dropped (the first of each kept), so none is "
                     "both held out and trained on"]
    with pytest.raises(UserError, match=r"^data.split: 'train' is not a split of someorg/prompts .*test_prefs"):
        load_instructions("someorg/prompts")
    with pytest.raises(UserError, match=r"^data.instructions: 'someorg/absent' is not in the local Hugging Face "
                                        r"cache and HF_HUB_OFFLINE is set; .*hf download someorg/absent"):
        load_instructions("someorg/absent")


def test_empty_rows_and_long_instructions_are_dropped_and_counted(tmp_path):
    path = _parquet(tmp_path / "p.parquet", {"prompt": ["short", None, "x" * 11, "  ", "y" * 10, "SHORT"]})
    items, notes = read_instructions(DataConfig(instructions=str(path), max_chars=10))
    assert [i.id for i in items] == [0, 4]
    assert notes == ["data.instructions: 2 empty lines or rows dropped",
                     "data.instructions: 1 repeated instructions dropped (the first of each kept), so none is both "
                     "held out and trained on",
                     "data.instructions: 1 instructions over data.max_chars 10 characters skipped; raise "
                     "data.max_chars to keep them"]


def test_shipped_jsonl_files_read_as_before(tmp_path):
    """The line reader is unchanged: ids are line numbers, categories kept, nothing dropped or noted."""
    items, notes = read_instructions(DataConfig(instructions=str(TINY / "instructions.jsonl")))
    assert [(i.id, i.text, i.category) for i in items] == [(n, r["instruction"], r["category"])
                                                           for n, r in enumerate(TINY_ROWS)]
    assert notes == []


QUICK = ["iterations=1", "sampling.k=2", "sampling.max_new_tokens=32", "train.epochs=1", "train.val_fraction=0",
         "judge.type=python", "judge.function=minitpo.verifiable:score"]


def _run(tmp_path, source):
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "datasets_cache"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "minitpo", "run", "recipes/tiny.yaml", "--out", str(tmp_path / "run"),
                           f"data.instructions={source}", *QUICK], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=env)


@pytest.mark.parametrize("kind", ["parquet", "folder"])
def test_the_tiny_recipe_runs_from_a_parquet_file_and_a_dataset_folder(tmp_path, kind):
    columns = {"instruction": [r["instruction"] for r in TINY_ROWS], "category": [r["category"] for r in TINY_ROWS]}
    if kind == "parquet":
        source = _parquet(tmp_path / "tiny.parquet", columns)
    else:
        _parquet(tmp_path / "tiny" / "train-00000-of-00001.parquet", columns)
        source = tmp_path / "tiny"
    result = _run(tmp_path, source)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "run" / "iter-1" / "candidates.jsonl")]
    by_text = {r["instruction"]: n for n, r in enumerate(TINY_ROWS)}
    assert len({r["instruction"] for r in rows}) == 16 and all(r["instruction"] in by_text for r in rows)
    assert all(r["instruction_id"] == by_text[r["instruction"]] for r in rows)  # ids: row numbers = line numbers
    assert (tmp_path / "run" / "iter-1" / "summary.json").is_file()
