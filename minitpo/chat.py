"""`minitpo chat`: talk to a trained model, its thought hidden unless asked for.

Consumes a PATH that is either an iteration folder (RUN_DIR/iter-N: the policy, template and sampling
settings come from RUN_DIR/recipe.yaml) or a bare peft adapter folder (its base model from
adapter_config.json, the generic template unless one is named), resolved by minitpo.rundir.
Produces replies sampled exactly as in training: the response only by default, the thought too on request.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import click

from minitpo.config import SamplingConfig
from minitpo.data import Instruction
from minitpo.model import load_policy
from minitpo.prompts import Template
from minitpo.rundir import resolve_adapter
from minitpo.sample import sample_candidates


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
    forced = resolved.sampling.force_marker and resolved.sampling.thought_tokens
    if max_new_tokens is not None and forced and forced >= max_new_tokens:  # the run's thought budget does not
        overrides["thought_tokens"] = max(1, max_new_tokens // 2)  # fit the shorter output: half, as its default
    sampling = dataclasses.replace(resolved.sampling, **{k: v for k, v in overrides.items() if v is not None})
    model, tokenizer = load_policy(resolved.policy, resolved.adapter_dir)
    model.eval()
    return ChatSession(model, tokenizer, resolved.template, resolved.system_prompt, sampling)


def reply(session: ChatSession, message: str, seed: int) -> Reply:
    """One sampled output for `message`, prompted, generated and split exactly as in training
    (sample_candidates with k = 1, so stop texts and the truncation rule apply here too)."""
    # plain generate, as chat has always sampled: one prompt at a time, nothing for the fast sampler to batch
    sampling = dataclasses.replace(session.sampling, engine="generate")
    [c] = sample_candidates(session.model, session.tokenizer, [Instruction(id=0, text=message)], session.template,
                            sampling, seed=seed, system_prompt=session.system_prompt, k=1, progress=False)
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
