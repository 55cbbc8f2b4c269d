"""Thought templates and the thought/response split.

Consumes: an instruction (str) and a `ThoughtConfig`. Produces: the prompt text the policy sees
(through its chat template when it has one), and, for each sampled output, either
(thought, response) or None for a parse failure.

The generic and specific templates are quoted from Wu et al. 2024, "Thinking LLMs: General
Instruction Following with Thought Generation" (arXiv 2410.10630); the specific one is the version
used by public reproductions. `think` is the generic one with <think>...</think> delimiters (ours).
`direct` is the paper's direct-response baseline: no thought at all.
"""

from dataclasses import dataclass, replace
from pathlib import Path

from minitpo.config import ThoughtConfig
from minitpo.errors import UserError


@dataclass(frozen=True)
class Template:
    name: str
    text: str  # holds one "{instruction}" placeholder
    marker: str | None  # the response starts after it; None means no thought (direct)
    thought_prefix: str = ""  # stripped from the start of the thought when present
    min_words: int = 0  # a thought of fewer words is a format failure (thought.min_words)
    prefill: bool = False  # the assistant's turn opens with thought_prefix and a newline (thought.prefill)

    @property
    def opening(self) -> str:
        """What the prompt ends with after the chat template's assistant start: the thought's opening
        with thought.prefill, else nothing."""
        return self.thought_prefix + "\n" if self.prefill else ""


GENERIC = Template(
    name="generic",
    text=(
        "Respond to the following user query in a comprehensive and detailed way. You can write down "
        'your thought process before responding. Write your thoughts after "Here is my thought '
        'process:" and write your response after "Here is my response:".\n\n'
        "User query: {instruction}"
    ),
    marker="Here is my response:",
    thought_prefix="Here is my thought process:",
)

SPECIFIC = Template(
    name="specific",
    text=(
        "Respond to the following user query in a comprehensive and detailed way. But first write down "
        "your internal thoughts. This must include your draft response and its evaluation. After this, "
        'write your final response after "<R>".\n\n'
        "User query: {instruction}"
    ),
    marker="<R>",
)

# Not from the paper: the generic prompt with the delimiters of today's reasoning models, so that a
# trained model writes its thought the way llama.cpp-based tools (and their users) expect.
THINK = Template(
    name="think",
    text=(
        "Respond to the following user query in a comprehensive and detailed way. You can write down "
        "your thought process before responding. Write your thoughts between <think> and </think>, and "
        "write your response after </think>.\n\n"
        "User query: {instruction}"
    ),
    marker="</think>",
    thought_prefix="<think>",
)

DIRECT = Template(name="direct", text="{instruction}", marker=None)

TEMPLATES = {t.name: t for t in (GENERIC, SPECIFIC, THINK, DIRECT)}


def load_template(thought: ThoughtConfig) -> Template:
    """The recipe's template: `thought.template` names one of TEMPLATES, or a text file with an
    {instruction} placeholder whose marker the recipe declares (`thought.marker`); with
    `thought.min_words` and `thought.prefill`."""
    name_or_path, marker, min_words = thought.template, thought.marker, thought.min_words
    if name_or_path in TEMPLATES:
        template = TEMPLATES[name_or_path]
        if thought.prefill and not template.thought_prefix:
            openings = ", ".join(t.name for t in TEMPLATES.values() if t.thought_prefix)
            raise UserError(f"thought.prefill: the {name_or_path} template has no thought opening to start the "
                            f"answer with; use a template that has one ({openings}) or set thought.prefill=false")
        return replace(template, min_words=min_words, prefill=thought.prefill)
    if thought.prefill:
        raise UserError(f"thought.prefill: a template file ({name_or_path}) declares no thought opening to start "
                        "the answer with; use thought.template=think or set thought.prefill=false")
    path = Path(name_or_path)
    if not path.is_file():
        raise UserError(
            f"thought.template: {name_or_path!r} is neither a named template ({', '.join(TEMPLATES)}) "
            "nor an existing file; name one or give the path of a template file"
        )
    text = path.read_text(encoding="utf-8")
    if text.count("{instruction}") != 1:
        raise UserError(
            f"thought.template: {path} must contain the placeholder {{instruction}} exactly once; add it"
        )
    if not marker:
        raise UserError(
            f"thought.marker: a custom template ({path}) needs the marker that starts the response; "
            'set thought.marker, for example "<R>"'
        )
    if marker not in text:
        raise UserError(
            f"thought.marker: {marker!r} does not appear in {path}; the template must tell the model "
            "to write it before the response"
        )
    return Template(name=str(path), text=text, marker=marker, min_words=min_words)


def build_messages(template: Template, instruction: str, system_prompt: bool = False) -> list[dict]:
    """Chat messages for one instruction. With `system_prompt`, the thought instructions go into the
    system message and the user turn holds the bare instruction (the paper's system-prompt variant)."""
    if system_prompt and template.marker is not None:
        head, _, _ = template.text.partition("{instruction}")
        system = head.removesuffix("User query: ").strip()
        return [{"role": "system", "content": system}, {"role": "user", "content": instruction}]
    return [{"role": "user", "content": template.text.replace("{instruction}", instruction)}]


def build_prompt(tokenizer, template: Template, instruction: str, system_prompt: bool = False) -> str:
    """The prompt string the policy continues. Goes through the tokenizer's chat template when it has
    one (the generation prompt included), else plain text and a newline, for the model to continue."""
    messages = build_messages(template, instruction, system_prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + template.opening
    return "\n\n".join(m["content"] for m in messages) + "\n" + template.opening


def prefilled_chat_template(chat_template: str, template: Template) -> str:
    """`chat_template` (Jinja) with the thought's opening written after the assistant's start whenever a
    generation prompt is asked for: what an exported model carries, so that any chat tool prompts it as it
    was trained (build_prompt). Unchanged without thought.prefill."""
    if not template.prefill:
        return chat_template
    opening = template.opening.replace("\n", "{{ '\\n' }}")  # a literal newline could be trimmed by the template's whitespace rules
    return chat_template + "{% if add_generation_prompt %}" + opening + "{% endif %}"


def word_count(thought: str) -> int:
    """Words in a thought, the one count thought.min_words and the thought rate use: runs of non-space."""
    return len(thought.split())


def split_output(text: str, template: Template) -> tuple[str, str] | None:
    """(thought, response), or None when the output breaks the format.

    Plain string matching, as in the paper. The marker must appear exactly once: with two, we could
    not tell which part the user would see, and a response never contains the marker. The response
    must be non-empty; the thought may be empty (the generic prompt makes thoughts optional), unless
    the template asks for `min_words` or more in it."""
    if template.marker is None:
        response = text.strip()
        return ("", response) if response else None
    if text.count(template.marker) != 1:
        return None
    thought, response = (part.strip() for part in text.split(template.marker))
    if template.thought_prefix:
        if template.thought_prefix in response:
            return None  # the thought came after the response: out of order
        thought = thought.removeprefix(template.thought_prefix).strip()
    if not response or word_count(thought) < template.min_words:
        return None
    return thought, response
