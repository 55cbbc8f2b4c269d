"""The recipe's schema: one frozen dataclass per section, every default and every range check.

Every default lives here and nowhere else; each dataclass checks its own values in __post_init__ and
raises `UserError` with the key, the bad value and the fix. Reading a YAML file into these classes
(paths, overrides, types, files) is minitpo.recipe.
"""

import importlib.util
from dataclasses import dataclass, field, replace
from typing import Literal

from minitpo.errors import UserError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GENERATE_AUTO_BATCH = 64  # sampling.batch_size auto under sampling.engine generate


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
        _check(self.lora_alpha >= 1, "policy.lora_alpha", self.lora_alpha, "use 1 or more (2 x lora_r is typical)")
        _check(0 <= self.lora_dropout < 1, "policy.lora_dropout", self.lora_dropout, "use [0, 1)")
        _check(len(self.target_modules) > 0, "policy.target_modules", [], "name at least one module")


@dataclass(frozen=True)
class ThoughtConfig:
    template: str = "generic"  # generic | specific | think | direct (no thought) | a template file
    marker: str | None = None  # for a template file: the text after which the response starts
    system_prompt: bool = False  # put the thought instructions in the system prompt (paper variant)
    min_words: int = 0  # an output whose thought has fewer words is a format failure (rejected, never
    #   chosen); forcing never appends the marker to a shorter one. 0: thoughts are optional, as in the paper
    prefill: bool = False  # the assistant's turn opens with the thought's opening ("<think>" and a newline), as
    #   DeepSeek-R1's and Qwen3's chat templates do: the model starts inside its thought and cannot skip it.
    #   Exported models carry it in their chat template. Only for templates with an opening (think, generic)

    def __post_init__(self):
        _check(self.min_words >= 0, "thought.min_words", self.min_words, "use 0 (no minimum) or more")


@dataclass(frozen=True)
class DataConfig:
    instructions: str  # .jsonl with "instruction" (and optional "category"), .txt one per line, .parquet,
    #   a dataset folder (save_to_disk, or parquet/json files) or a Hub dataset id (downloaded once, cached)
    split: str = "train"  # a dataset's split (a .jsonl/.txt/.parquet file is one split)
    column: str | None = None  # a dataset's column; null = the first of instruction, prompt, messages,
    #   conversations (a chat column gives its first user turn)
    max_chars: int = 4000  # longer instructions are skipped and counted (~1,000 tokens: room left to answer)
    per_iteration: int = 5000  # fresh instructions per iteration, never reused (paper: 5,000)
    held_out: int = 0  # set aside first, for `minitpo eval`; never trained on
    seed: int = 0  # shuffles the file before slicing

    def __post_init__(self):
        _check(self.per_iteration >= 1, "data.per_iteration", self.per_iteration, "use 1 or more")
        _check(self.held_out >= 0, "data.held_out", self.held_out, "use 0 or more")
        _check(self.seed >= 0, "data.seed", self.seed, "use 0 or more")
        _check(self.max_chars >= 1, "data.max_chars", self.max_chars, "use 1 or more (4000 is typical)")


@dataclass(frozen=True)
class SamplingConfig:
    k: int = 8  # candidates per instruction (paper: 8); time grows linearly with k
    temperature: float = 0.8  # paper: 0.8
    top_p: float = 0.95  # paper: 0.95
    max_new_tokens: int = 1024  # thought + response; a candidate that hits it is a parse failure
    batch_size: int | Literal["auto"] = "auto"  # sequences decoded at once. auto: under engine fast, as many as
    #   the free memory holds, up to 256 (known only when sampling starts: iter-N/stages.json records each
    #   pass's sampling_slots); under engine generate, 64 (resolved here, so recipe.yaml says 64)
    memory_gb: float | None = None  # cap on the sampler's memory (its weight copy, KV cache, workspace); null = free memory
    seed: int = 0  # iteration t samples with seed + t
    engine: Literal["fast", "generate"] = "fast"  # fast: minitpo/engine.py; generate: plain transformers
    stop: tuple[str, ...] = ()  # texts that end an output like EOS (for base models that never emit EOS)
    force_marker: bool = False  # the thought gets thought_tokens; an output that ends or reaches that
    #   before the marker gets it appended and goes on to its response (s1-style budget forcing), for
    #   small models that do not write the format by themselves. Off in the paper's recipes
    thought_tokens: int | None = None  # with force_marker: the thought's budget; null = half of max_new_tokens
    #   (resolved here when force_marker is on; without it the budget is not used and stays null)
    unforced: int = 0  # with force_marker: the last this many of each instruction's K are never forced, so
    #   that an output without the marker is a format failure and the rejected side of its pair (the
    #   paper's rule): the preference DPO needs to learn the marker. Forcing shrinks by itself as the
    #   model writes the marker more often: an output that has it is never forced

    def __post_init__(self):
        _check(self.k >= 2, "sampling.k", self.k, "use 2 or more: a pair needs two candidates")
        _check(self.temperature >= 0, "sampling.temperature", self.temperature, "use 0 (greedy) or more")
        _check(0 < self.top_p <= 1, "sampling.top_p", self.top_p, "use a value in (0, 1]")
        _check(self.max_new_tokens >= 1, "sampling.max_new_tokens", self.max_new_tokens, "use 1 or more")
        _check(self.batch_size == "auto" or self.batch_size >= 1, "sampling.batch_size", self.batch_size,
               "use 1 or more, or auto")
        _check(self.memory_gb is None or self.memory_gb > 0, "sampling.memory_gb", self.memory_gb,
               "use a positive number of GB, or null")
        _check(self.seed >= 0, "sampling.seed", self.seed, "use 0 or more")
        _check(all(self.stop), "sampling.stop", list(self.stop), "remove the empty text: it would stop every output at once")
        _check(self.thought_tokens is None or 1 <= self.thought_tokens < self.max_new_tokens,
               "sampling.thought_tokens", self.thought_tokens, "use 1 to max_new_tokens - 1, or null")
        _check(0 <= self.unforced < self.k, "sampling.unforced", self.unforced,
               f"use 0 to k - 1 ({self.k - 1}): at least one candidate per instruction may be forced")
        _check(self.max_new_tokens >= 2 or not self.force_marker, "sampling.max_new_tokens", self.max_new_tokens,
               "use 2 or more with force_marker: the thought and the response need a token each")
        # Defaults that depend on other settings, resolved here so that recipe.yaml records what ran
        if self.force_marker and self.thought_tokens is None:
            object.__setattr__(self, "thought_tokens", max(1, self.max_new_tokens // 2))
        if self.engine == "generate" and self.batch_size == "auto":
            object.__setattr__(self, "batch_size", GENERATE_AUTO_BATCH)


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
    rho: float | Literal["auto"] = 0.0  # length control in [0, 0.5] (docs/method.md step 5); auto = tuned per iteration
    prompt: str | None = None  # judge prompt template file with {instruction} and {response}
    quantization: Literal["nf4", "none"] = "none"  # reward_model: load it 4-bit to save memory
    batch_size: int = 16  # reward_model: responses scored per forward pass
    check: bool = False  # `minitpo run` first runs `minitpo judge-check` (saved as judge_check.json) and
    #   warns when the judge cannot be told from chance; a GGUF judge on 256 items takes a minute or two
    # llama_cpp pointwise: a response on whose verdict (the digits 1-9) the judge puts less probability
    # than this is unjudged: left out of pairs and counted, never scored. Under 0.5, the judge's likeliest
    # next text is not a rating at all: read as text, its verdict would fail to parse more often than not.
    min_verdict_mass: float = 0.5
    # A response the judge scores below this is never the chosen side of a pair (it may be the rejected one);
    # null: any parsed response may be chosen. For a judge whose lowest scores mean "no answer at all" (the
    # verifiable rule judge's 0 for an empty, two-word or copied reply).
    min_chosen: float | None = None

    def __post_init__(self):
        if self.rho != "auto":
            _check(0 <= self.rho <= 0.5, "judge.rho", self.rho, "use a value in [0, 0.5] (paper's range) or auto")
        _check(self.n_ctx >= 64, "judge.n_ctx", self.n_ctx, "use 64 or more (4096 is typical)")
        _check(self.n_gpu_layers >= -1, "judge.n_gpu_layers", self.n_gpu_layers, "use -1 (all), 0 (CPU only) or a layer count")
        _check(self.n_threads is None or self.n_threads >= 1, "judge.n_threads", self.n_threads, "use 1 or more, or null")
        if self.type == "llama_cpp" and not self.model:
            raise UserError("judge.model: missing; the llama_cpp judge needs the path of a GGUF file")
        if self.type == "reward_model" and not self.model:
            raise UserError("judge.model: missing; the reward_model judge needs a Hub id or folder")
        if self.mode == "pairwise" and self.type != "llama_cpp":
            raise UserError(f"judge.mode: pairwise works with judge.type llama_cpp, not {self.type!r}; change one")
        _check(self.batch_size >= 1, "judge.batch_size", self.batch_size, "use 1 or more")
        _check(0 <= self.min_verdict_mass < 1, "judge.min_verdict_mass", self.min_verdict_mass,
               "use [0, 1) (0 scores every response, 0.5 is the default)")
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
    gradient_checkpointing: bool | None = None  # null = on with nf4 (saves memory, costs ~30% time); resolved
    #   with the policy's quantization when the recipe is read (Recipe), so recipe.yaml says true or false
    val_fraction: float = 0.0  # pairs held out to pick the best epoch (paper picks by held-out score)
    logps_chunk: int = 1024  # tokens per chunk of the LM head; memory grows with chunk * vocab
    # Matmuls of the reference and training passes. auto: bfloat16 on CUDA and on a CPU with native bf16
    # (AMX or AVX512-BF16: 1.3x faster steps there, benchmarks/RESULTS.md), else the weights' own dtype.
    autocast: Literal["auto", "bfloat16", "none"] = "auto"
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
        _check(self.max_grad_norm > 0, "train.max_grad_norm", self.max_grad_norm, "use a positive norm (1.0 is typical)")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "use 0 or more")
        _check(self.seed >= 0, "train.seed", self.seed, "use 0 or more")


def installed(package: str) -> bool:
    """Whether `package` can be imported here, found without importing it."""
    return importlib.util.find_spec(package) is not None


def _default_log() -> str:
    # Resolved when the recipe is read, so recipe.yaml records what the run logged to
    return "tensorboard" if installed("tensorboard") else "none"


@dataclass(frozen=True)
class LogConfig:
    to: Literal["tensorboard", "wandb", "none"] = field(default_factory=_default_log)  # live metrics (minitpo/live.py):
    #   TensorBoard event files in RUN_DIR/logs/, or a Weights & Biases run (WANDB_PROJECT, WANDB_MODE as
    #   wandb reads them); default tensorboard when the package is installed, else none


@dataclass(frozen=True)
class Recipe:
    policy: PolicyConfig
    data: DataConfig
    judge: JudgeConfig
    thought: ThoughtConfig = field(default_factory=ThoughtConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    iterations: int = 4  # paper: 4
    evaluate: bool = False  # after the last iteration, `minitpo eval` it against the seed (held-out win rate)
    out: str | None = None  # run directory; default runs/<recipe name>

    def __post_init__(self):
        _check(self.iterations >= 1, "iterations", self.iterations, "use 1 or more")
        if self.evaluate and self.data.held_out < 1:
            raise UserError("evaluate: true needs held-out instructions; set data.held_out (32 or more) or evaluate: false")
        if self.sampling.force_marker and self.thought.template == "direct":
            raise UserError("sampling.force_marker: true needs a thought template with a marker, not 'direct'; "
                            "set it to false or pick another thought.template")
        if self.train.gradient_checkpointing is None:  # resolved here, so that recipe.yaml records it
            object.__setattr__(self, "train", replace(self.train, gradient_checkpointing=self.policy.quantization == "nf4"))

