"""Every kind of bad input, through the real CLI entry point (`minitpo.cli.main`, as the console script
calls it): one line on stderr that names the key or file, exit status 2, no traceback, and nothing
written, which also means no model was loaded (the run directory is created before anything loads).

Each case builds its input in a temporary folder from the tiny recipe; the table below is the catalog
of bad inputs and their messages."""

import json
import sys

import pytest

from conftest import ROOT, TINY
from minitpo import cli

TINY_RECIPE = (ROOT / "recipes" / "tiny.yaml").read_text().replace(": tiny/", f": {TINY}/")


def _setup(tmp):
    """Files the cases point at."""
    (tmp / "binary.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe\x00")
    (tmp / "nul.txt").write_bytes(b"write a poem\x00\x00\n")
    (tmp / "broken.jsonl").write_text('{"instruction": "a"}\n{"instruction": "b"}\n{"instruction": "c",\n')
    (tmp / "number.jsonl").write_text('{"instruction": "a"}\n{"instruction": 7}\n')
    (tmp / "empty_folder").mkdir()
    (tmp / "a_file").write_text("x")
    (tmp / "weights.bin").write_bytes(b"\x00" * 64)
    (tmp / "fake.gguf").write_bytes(b"\x00" * 64)
    (tmp / "no_placeholder.txt").write_text("Think, then answer after <R>.")
    (tmp / "no_marker.txt").write_text("Think first. {instruction}")
    (tmp / "judge_no_response.txt").write_text("Rate the answer to {instruction} from 1 to 9.")
    (tmp / "latin1.yaml").write_bytes(TINY_RECIPE.replace("# tiny", "# caf\xe9").encode("latin-1"))
    (tmp / "list.yaml").write_text("- policy\n- data\n")
    (tmp / "no_policy.yaml").write_text("data: {instructions: x.jsonl}\njudge: {type: python, function: m:f}\n")
    two_train = TINY_RECIPE + "train:\n  lr: 5.0e-5\n"  # a second train: section, as pasted from another recipe
    (tmp / "two_train.yaml").write_text(two_train)
    (tmp / "twice_k.yaml").write_text(TINY_RECIPE.replace("  k: 4\n", "  k: 4\n  k: 8\n"))
    bomb = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10))  # 9^9 values
    (tmp / "bomb.yaml").write_text(TINY_RECIPE + "l0: &l0 lol\n" + bomb)
    small = ", ".join(f"&l{i} [{', '.join([f'*l{i - 1}'] * 4)}]" for i in range(1, 6))  # 1365 values in sampling.k
    (tmp / "small_bomb.yaml").write_text(TINY_RECIPE.replace("  k: 4\n", f"  k: [&l0 lol, {small}]\n"))
    lines = (TINY / "instructions.jsonl").read_text().splitlines()[:39]  # with the long one: the 40 the recipe uses
    lines.insert(2, json.dumps({"instruction": "Explain this. " + "word " * 2000}))
    (tmp / "long.jsonl").write_text("\n".join(lines) + "\n")
    (tmp / "thesis" / "data").mkdir(parents=True)  # a user's folder: minitpo must never delete or write into it
    (tmp / "thesis" / "thesis.tex").write_text("\\chapter{One}")
    (tmp / "thesis" / "data" / "table.csv").write_text("a,b\n")


RANGE = [  # (override, key named in the message): every numeric key out of its range
    ("sampling.k=1", "sampling.k"), ("sampling.temperature=-1", "sampling.temperature"),
    ("sampling.top_p=0", "sampling.top_p"), ("sampling.max_new_tokens=0", "sampling.max_new_tokens"),
    ("sampling.batch_size=0", "sampling.batch_size"), ("sampling.thought_tokens=64", "sampling.thought_tokens"),
    ("sampling.batch_size=lots", "sampling.batch_size"), ("sampling.memory_gb=0", "sampling.memory_gb"),
    ("sampling.seed=-1", "sampling.seed"), ("data.per_iteration=0", "data.per_iteration"),
    ("data.held_out=-1", "data.held_out"), ("data.seed=-1", "data.seed"), ("policy.lora_r=0", "policy.lora_r"),
    ("policy.lora_alpha=0", "policy.lora_alpha"), ("policy.lora_dropout=1", "policy.lora_dropout"),
    ("judge.n_ctx=10", "judge.n_ctx"), ("judge.n_gpu_layers=-2", "judge.n_gpu_layers"),
    ("judge.n_threads=0", "judge.n_threads"), ("judge.rho=0.9", "judge.rho"), ("judge.batch_size=0", "judge.batch_size"),
    ("train.beta=0", "train.beta"), ("train.label_smoothing=0.5", "train.label_smoothing"),
    ("train.nll_weight=-1", "train.nll_weight"), ("train.lr=0", "train.lr"), ("train.epochs=0", "train.epochs"),
    ("train.batch_size=0", "train.batch_size"), ("train.grad_accum=0", "train.grad_accum"),
    ("train.max_length=8", "train.max_length"), ("train.warmup_ratio=1", "train.warmup_ratio"),
    ("train.max_grad_norm=0", "train.max_grad_norm"), ("train.weight_decay=-1", "train.weight_decay"),
    ("train.val_fraction=1", "train.val_fraction"), ("train.logps_chunk=0", "train.logps_chunk"),
    ("train.seed=-1", "train.seed"), ("iterations=0", "iterations"),
]

CASES = [  # (id, recipe file or None for the tiny recipe, extra arguments, text the one line must hold)
    *[(f"range:{o}", None, [o], f"{key}: ") for o, key in RANGE],
    ("infinite lr", None, ["train.lr=.inf"], "train.lr: inf is not a finite number"),
    ("nan temperature", None, ["sampling.temperature=.nan"], "sampling.temperature: nan is not a finite number"),
    ("wrong type", None, ["sampling.k=four"], "sampling.k: 'four' has the wrong type"),
    ("unknown key", None, ["sampling.temprature=1"], "sampling.temprature: unknown recipe key; did you mean 'sampling.temperature'"),
    ("not a choice", None, ["judge.mode=best"], "judge.mode: 'best' is not one of pointwise, pairwise"),
    ("override without =", None, ["sampling.k"], "override: 'sampling.k' is not KEY=VALUE"),
    ("unknown option", None, ["--outt", "x"], "No such option '--outt'. Did you mean '--out'? (see minitpo run --help)"),
    ("recipe missing", "TMP/nope.yaml", [], "recipe: 'TMP/nope.yaml' does not exist"),
    ("recipe is a folder", "TMP/empty_folder", [], "recipe: 'TMP/empty_folder' is a folder"),
    ("recipe not UTF-8", "TMP/latin1.yaml", [], "recipe: TMP/latin1.yaml is not UTF-8 text"),
    ("recipe not a mapping", "TMP/list.yaml", [], "must be a mapping of sections"),
    ("recipe without policy", "TMP/no_policy.yaml", [], "policy: missing"),
    ("instructions binary", None, ["data.instructions=TMP/binary.jsonl"], "binary.jsonl line 1 is not UTF-8 text"),
    ("instructions with NUL", None, ["data.instructions=TMP/nul.txt"], "nul.txt line 1 holds NUL bytes"),
    ("instructions bad JSON line", None, ["data.instructions=TMP/broken.jsonl"], "broken.jsonl line 3 is not a JSON object"),
    ("instruction not text", None, ["data.instructions=TMP/number.jsonl"], 'number.jsonl line 2: "instruction" is int'),
    ("instructions is a folder", None, ["data.instructions=TMP/empty_folder"], "data.instructions: 'TMP/empty_folder' holds no data files"),
    ("instructions missing", None, ["data.instructions=TMP/none.jsonl"], "data.instructions: 'TMP/none.jsonl' does not exist"),
    ("too few instructions", None, ["data.per_iteration=1000"], "the recipe needs 2008"),
    ("policy empty folder", None, ["policy.model=TMP/empty_folder"], "policy.model: 'TMP/empty_folder' is a folder without config.json"),
    ("policy not a model file", None, ["policy.model=TMP/weights.bin"], "policy.model: 'TMP/weights.bin' is a file but not a .gguf"),
    ("policy fake gguf", None, ["policy.model=TMP/fake.gguf"], "policy.model: 'TMP/fake.gguf' is not a GGUF file"),
    ("policy missing", None, ["policy.model=TMP/none/model"], "policy.model: 'TMP/none/model' does not exist"),
    ("judge gguf is a folder", None, ["judge.model=TMP/empty_folder"], "judge.model: 'TMP/empty_folder' is a folder"),
    ("judge not gguf", None, ["judge.model=TMP/fake.gguf"], "judge.model: 'TMP/fake.gguf' is not a GGUF file"),
    ("llama_cpp judge without model", None, ["judge.model=null"], "judge.model: missing"),
    ("python judge no module", None, ["judge.type=python", "judge.function=no_such_module:f"],
     "judge.function: module 'no_such_module' cannot be imported"),
    ("python judge not callable", None, ["judge.type=python", "judge.function=minitpo.verifiable:__doc__"],
     "judge.function: minitpo.verifiable has no callable '__doc__'"),
    ("python judge file missing", None, ["judge.type=python", "judge.function=TMP/j.py:score"], "judge.function: TMP/j.py does not exist"),
    ("python judge no colon", None, ["judge.type=python", "judge.function=score"], "judge.function: 'score' is not 'module:callable'"),
    ("pairwise python judge", None, ["judge.type=python", "judge.function=minitpo.verifiable:score", "judge.mode=pairwise"],
     "judge.mode: pairwise works with judge.type llama_cpp"),
    ("reward model missing", None, ["judge.type=reward_model", "judge.model=TMP/none/rm"], "judge.model: 'TMP/none/rm' does not exist"),
    ("reward model empty folder", None, ["judge.type=reward_model", "judge.model=TMP/empty_folder"], "is a folder without config.json"),
    ("judge prompt is a folder", None, ["judge.prompt=TMP/empty_folder"], "judge.prompt: 'TMP/empty_folder' is a folder"),
    ("judge prompt without placeholder", None, ["judge.prompt=TMP/judge_no_response.txt"], "must contain {response} exactly once"),
    ("template unknown name", None, ["thought.template=generik"], "thought.template: 'generik' is neither a named template"),
    ("template without placeholder", None, ["thought.template=TMP/no_placeholder.txt", "thought.marker=<R>"],
     "must contain the placeholder {instruction}"),
    ("template marker absent", None, ["thought.template=TMP/no_marker.txt", "thought.marker=<R>"], "thought.marker: '<R>' does not appear"),
    ("template without marker key", None, ["thought.template=TMP/no_marker.txt"], "thought.marker: a custom template"),
    ("empty stop text", None, ["sampling.stop=['']"], "sampling.stop: [''] is out of range"),
    ("force_marker without thought", None, ["thought.template=direct", "sampling.force_marker=true"],
     "sampling.force_marker: true needs a thought template with a marker"),
    ("evaluate without held-out", None, ["evaluate=true", "data.held_out=0"], "evaluate: true needs held-out instructions"),
    ("out is a file", None, ["--out", "TMP/a_file"], "out: 'TMP/a_file' is a file"),
    ("out under a file", None, ["--out", "TMP/a_file/run"], "out: 'TMP/a_file/run' cannot be created: 'TMP/a_file' is a file"),
    # settings that cannot train, and recipes that do not say what they seem to (issue 26)
    ("ipo with label smoothing", None, ["train.loss=ipo", "train.label_smoothing=0.1"],
     "train.label_smoothing: 0.1 works with train.loss sigmoid only, not 'ipo'"),
    ("hinge with label smoothing", None, ["train.loss=hinge", "train.label_smoothing=0.2"],
     "train.label_smoothing: 0.2 works with train.loss sigmoid only, not 'hinge'"),
    ("greedy candidates", None, ["sampling.temperature=0"],
     "sampling.temperature: 0 samples greedily, so the 4 candidates of an instruction are the same"),
    ("validation with one epoch", None, ["train.epochs=1"],
     "train.val_fraction: 0.25 sets pairs aside to pick the best epoch, and train.epochs is 1"),
    ("validation takes most pairs", None, ["train.val_fraction=0.9"],
     "train.val_fraction: 0.9 leaves at most 2 of data.per_iteration 16 pairs to train on, fewer than train.batch_size 4"),
    ("thought words without a thought", None, ["thought.template=direct", "thought.min_words=3"],
     "thought.min_words: 3 with the direct template (no thought) makes every output a format failure"),
    ("stop text is the marker", None, ["sampling.stop=['Here is my response:']"],
     "sampling.stop: 'Here is my response:' holds the thought marker 'Here is my response:'"),
    ("judge context below its prompt", None, ["judge.n_ctx=300"],
     "judge.n_ctx: 300 tokens cannot hold the pointwise judge prompt itself (360 tokens before any instruction"),
    ("judge context below eval's pairwise prompt", None, ["judge.n_ctx=400", "evaluate=true"],
     "judge.n_ctx: 400 tokens cannot hold the pairwise judge prompt itself (435 tokens"),
    ("instruction longer than the context", None, ["data.instructions=TMP/long.jsonl", "data.max_chars=20000"],
     "data.instructions: line 3 makes a prompt of 4067 tokens, and with sampling.max_new_tokens 64 it does not "
     "fit the policy's context of 512 tokens"),
    ("two train sections", "TMP/two_train.yaml", [], "recipe: TMP/two_train.yaml sets 'train' twice in one section (lines 29 and 36)"),
    ("a key twice", "TMP/twice_k.yaml", [], "sets 'k' twice in one section (lines 19 and 20)"),
    ("alias bomb", "TMP/bomb.yaml", [], "recipe: TMP/bomb.yaml stands for more than 10000 values"),
    ("small alias bomb, short line", "TMP/small_bomb.yaml", [], "sampling.k: ['lol', ['lol', 'lol', 'lol', 'lol'], [['lol', 'lol', 'lol',... has the wrong type"),
    # minitpo deletes only what it wrote (issue 26)
    ("--fresh on a user's folder", None, ["--out", "TMP/thesis", "--fresh"],
     "out: 'TMP/thesis' is not a run directory minitpo made (it holds 'data', 'thesis.tex') and --fresh deletes only those"),
    ("run into a user's folder", None, ["--out", "TMP/thesis"], "out: 'TMP/thesis' holds files minitpo did not write ('data', 'thesis.tex')"),
    ("--out empty", None, ["--out", "", "--fresh"], "out: '' is empty; give a run directory"),
]


@pytest.mark.parametrize("case, recipe, extra, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, monkeypatch, capsys, case, recipe, extra, message):
    _setup(tmp_path)
    (tmp_path / "tiny.yaml").write_text(TINY_RECIPE)
    fill = lambda s: s.replace("TMP", str(tmp_path))  # noqa: E731
    out = tmp_path / "run"
    argv = ["minitpo", "run", fill(recipe or "TMP/tiny.yaml"), *map(fill, extra)]
    if "--out" not in extra:
        argv += ["--out", str(out)]
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert fill(message) in lines[0], lines[0]
    assert len(lines[0]) < 400, f"{len(lines[0])} characters"  # one short line, whatever the input held
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert (tmp_path / "a_file").read_text() == "x"
    assert sorted(p.name for p in (tmp_path / "thesis").rglob("*")) == ["data", "table.csv", "thesis.tex"]


def test_a_run_directory_of_another_recipe_is_refused_and_kept(tmp_path, monkeypatch, capsys):
    """The one case that needs an existing run directory: its recipe.yaml is left exactly as it was."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.yaml").write_text("policy: {model: other}\n")
    (tmp_path / "tiny.yaml").write_text(TINY_RECIPE)
    monkeypatch.setattr(sys, "argv", ["minitpo", "run", str(tmp_path / "tiny.yaml"), "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "holds a run of a different recipe" in err[0], err
    assert (out / "recipe.yaml").read_text() == "policy: {model: other}\n"
