"""Use a trained adapter outside the loop: chat with it, or export it merged into its base model.

Consumes a PATH that is either an iteration folder (`RUN_DIR/iter-N`: the adapter in `iter-N/adapter`,
the policy, template and sampling settings in `RUN_DIR/recipe.yaml`) or a bare peft adapter folder
(the base model named by `base_model_name_or_path` in its `adapter_config.json`, the generic template
unless one is named). `resolve_adapter` turns either into the same `Resolved` settings, for both uses.

Produces, for `minitpo chat`, replies: the response only by default, the thought too on request; for
`minitpo export`, a plain transformers model folder (base + LoRA merged, full precision, with the
tokenizer) that `AutoModelForCausalLM.from_pretrained` loads without peft.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from minitpo.config import PolicyConfig, SamplingConfig
from minitpo.recipe import load_recipe
from minitpo.errors import UserError
from minitpo.io import read_json, write_dir
from minitpo.model import load_policy
from minitpo.data import Instruction
from minitpo.prompts import Template, load_template
from minitpo.sample import generate_tokens, sample_candidates


@dataclass(frozen=True)
class Resolved:
    policy: PolicyConfig
    adapter_dir: Path
    template: Template
    system_prompt: bool  # the thought instructions go in the system prompt (recipe's thought.system_prompt)
    sampling: SamplingConfig  # the recipe's, or the defaults for a bare adapter


def resolve_adapter(path: str | Path, template: str | None = None) -> Resolved:
    """The settings to load and prompt the model of PATH. `template` (a named template) overrides the
    recipe's. An adapter folder inside a run (`RUN_DIR/iter-N/adapter`) reads the run's recipe too."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        adapter = path
        recipe_path = path.parent.parent / "recipe.yaml" if path.name == "adapter" else None
    elif (path / "adapter" / "adapter_config.json").is_file():
        adapter, recipe_path = path / "adapter", path.parent / "recipe.yaml"
        if not recipe_path.is_file():
            raise UserError(
                f"PATH: {str(path)!r} looks like an iteration folder but {str(recipe_path)!r} does not exist; "
                f"give the adapter folder {str(adapter)!r} instead (its base model is read from adapter_config.json)"
            )
    else:
        raise UserError(_not_an_adapter(path))

    if recipe_path is not None and recipe_path.is_file():
        recipe = load_recipe(recipe_path, check_files=False)  # the run wrote absolute paths into it
        thought = recipe.thought
        return Resolved(policy=recipe.policy, adapter_dir=adapter,
                        template=load_template(template or thought.template, thought.marker),
                        system_prompt=thought.system_prompt, sampling=recipe.sampling)

    config = read_json(adapter / "adapter_config.json")
    base = config.get("base_model_name_or_path")
    if not base:
        raise UserError(
            f"PATH: {str(adapter / 'adapter_config.json')!r} names no base_model_name_or_path; "
            "add the base model's folder or Hub id there, or give the adapter's iteration folder (RUN_DIR/iter-N)"
        )
    # A bare adapter carries no recipe: load its base in full precision, the portable choice.
    return Resolved(policy=PolicyConfig(model=base, quantization="none"), adapter_dir=adapter,
                    template=load_template(template or "generic"), system_prompt=False, sampling=SamplingConfig())


def _not_an_adapter(path: Path) -> str:
    if not path.exists():
        return f"PATH: {str(path)!r} does not exist; give an iteration folder (RUN_DIR/iter-N) or an adapter folder"
    trained = [p.parent.parent for p in path.glob("iter-*/adapter/adapter_config.json")]
    trained = sorted((p for p in trained if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
    if (path / "recipe.yaml").is_file() and trained:
        return f"PATH: {str(path)!r} is a run directory; give one of its iterations, e.g. {str(trained[-1])!r}"
    if path.name.startswith("iter-"):
        return (f"PATH: {str(path)!r} has no adapter/adapter_config.json: this iteration has not finished "
                "training; run `minitpo run` again to finish it, or give an earlier iteration")
    return (f"PATH: {str(path)!r} holds no adapter_config.json; give an iteration folder (RUN_DIR/iter-N) "
            "or a peft adapter folder")


# ---------------------------------------------------------------- chat

@dataclass(frozen=True)
class ChatSession:
    model: object  # the peft model, in eval mode
    tokenizer: object
    template: Template
    system_prompt: bool
    sampling: SamplingConfig


@dataclass(frozen=True)
class Reply:
    text: str  # as generated, special tokens dropped
    thought: str
    response: str
    parsed: bool
    truncated: bool  # stopped by max_new_tokens instead of EOS


def open_chat(path: str | Path, template: str | None = None, max_new_tokens: int | None = None,
              temperature: float | None = None) -> ChatSession:
    """Load the policy of PATH with its adapter. Unset sampling options come from the recipe
    (or SamplingConfig's defaults for a bare adapter)."""
    resolved = resolve_adapter(path, template)
    overrides = {"max_new_tokens": max_new_tokens, "temperature": temperature}
    sampling = dataclasses.replace(resolved.sampling, **{k: v for k, v in overrides.items() if v is not None})
    model, tokenizer = load_policy(resolved.policy, resolved.adapter_dir)
    model.eval()
    return ChatSession(model, tokenizer, resolved.template, resolved.system_prompt, sampling)


def reply(session: ChatSession, message: str, seed: int) -> Reply:
    """One sampled output for `message`, prompted, generated and split exactly as in training
    (sample_candidates with k = 1, so stop texts and the truncation rule apply here too)."""
    [c] = sample_candidates(session.model, session.tokenizer, [Instruction(id=0, text=message)], session.template,
                            session.sampling, seed=seed, system_prompt=session.system_prompt,
                            engine=generate_tokens, k=1, progress=False)
    return Reply(text=c.text, thought=c.thought, response=c.response, parsed=c.parsed, truncated=c.truncated)


def format_reply(r: Reply, session: ChatSession, show_thought: bool) -> str:
    if not r.parsed:
        if r.truncated:
            why = f"hit the {session.sampling.max_new_tokens}-token limit (--max-new-tokens) before it ended"
        elif session.template.marker is None:
            why = "is empty"
        else:
            why = f"does not split into thought and response at the marker {session.template.marker!r}"
        return f"(note: the output {why}; showing the raw text)\n{r.text}"
    if show_thought:
        return f"[thought]\n{r.thought or '(none)'}\n\n[response]\n{r.response}"
    return r.response


def read_messages(stream):
    """User messages from `stream`, one per line, until end of input or a line reading "exit"."""
    interactive = stream.isatty()
    if interactive:
        click.echo('One message per line; "exit" or Ctrl-D to quit.', err=True)
    while True:
        if interactive:
            click.echo("> ", nl=False, err=True)
        line = stream.readline()
        if not line or line.strip() == "exit":
            return
        if line.strip():
            yield line.strip()


# ---------------------------------------------------------------- export

def export_merged(path: str | Path, out: str | Path) -> Path:
    """Merge the adapter of PATH into its base and save the result with its tokenizer into OUT.

    The base is loaded in float32, never NF4: merging adds (alpha / r) * B @ A to every target weight,
    and rounding that sum to 4 bits would throw most of the update away. The merged weights are then
    saved in the base's own dtype (float32 when its config names none), rounded once."""
    out = Path(out)
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise UserError(f"OUT: {str(out)!r} already exists and is not empty; give a new folder or delete this one first")
    resolved = resolve_adapter(path)
    policy = dataclasses.replace(resolved.policy, quantization="none", dtype="float32")
    save_dtype = _own_dtype(policy.model)
    model, tokenizer = load_policy(policy, resolved.adapter_dir, device="cpu")
    merged = model.merge_and_unload(safe_merge=True).to(save_dtype).eval()  # safe_merge: fail on NaN

    def fill(tmp: Path):
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    write_dir(out, fill)
    return out


def _own_dtype(model: str) -> torch.dtype:
    """The dtype the base model's config names (e.g. bfloat16); float32 for a GGUF or when unknown."""
    from transformers import AutoConfig

    if model.endswith(".gguf"):
        return torch.float32  # dequantized on load: float32 is the precision it has in memory
    try:
        dtype = getattr(AutoConfig.from_pretrained(model), "dtype", None)
    except (OSError, ValueError):
        return torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32
