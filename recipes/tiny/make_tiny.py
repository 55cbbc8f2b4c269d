"""Make the tiny offline fixtures that minitpo's tests and smoke recipes run on.

Writes, next to this file:
  policy/             a 377k-parameter Llama-style causal LM with a byte-level BPE tokenizer and a
                      ChatML chat template; AutoModelForCausalLM / AutoTokenizer load it offline.
  instructions.jsonl  48 synthetic instructions ({"instruction", "category"}) to sample on.
  judge.gguf          a random-weight llama-architecture GGUF with the same vocabulary, for the
                      llama.cpp judge path (scores are meaningless; only the plumbing is real).

Why: the real pipeline (sample thought+response candidates, parse them, judge, DPO-train a LoRA)
needs a model that follows the thought templates *sometimes*. The policy is trained for a minute on
synthetic text in a made-up world of foxes, rivers and lamps: for the generic and specific templates
it writes "thought, marker, response", and about a third of its training completions break the
format (marker missing, marker twice, empty response, response before thought), so sampled outputs
parse at a rate strictly between 0 and 1 (about 0.75). Responses are 1 to 3 sentences long, so
length control matters. Completions end with <|im_end|> after about 30 tokens (at most ~50).

Run from the repository root: python recipes/tiny/make_tiny.py   (1-2 minutes on 2 idle CPU cores)
Everything is seeded; a rerun on the same machine rewrites the same files.
"""

import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository root, for minitpo.prompts

from minitpo.prompts import DIRECT, GENERIC, SPECIFIC, build_messages, build_prompt  # noqa: E402

SEED = 1234
VOCAB_SIZE = 640       # an upper bound: BPE runs out of merges at 637 on this corpus
N_TRAIN = 6000          # synthetic (prompt, completion) pairs
MALFORMED = 0.35        # share of thought-template completions that break the format
TRAIN_STEPS = 500
BATCH = 32
LR = 3e-3
JUDGE_INIT = 0.3       # init std of the random judge: large enough for scores to vary with input
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# -----------------------------------------------------------------------------
# the synthetic world

NOUNS = ["fox", "river", "moon", "stone", "garden", "lamp", "ship", "bread", "cloud", "bird",
         "tree", "city", "horse", "window", "song", "road", "apple", "clock", "forest", "boat"]
ADJS = ["red", "quiet", "old", "bright", "small", "cold", "green", "warm", "tall", "slow"]
VERBS = ["rests", "moves", "shines", "waits", "grows", "sings", "turns", "falls"]
PLACES = ["near the hill", "by the sea", "in the morning", "under the sky", "at night",
          "in the town"]
CATEGORIES = {
    "describe": ["Describe the {a} {n}.", "Tell me about the {a} {n}.", "What is the {n} like?"],
    "explain": ["Explain why the {n} is {a}.", "Why does the {n} {v0}?", "How does the {n} work?"],
    "list": ["List some facts about the {n}.", "Give me {k} facts about the {n}.",
             "Name things near the {n}."],
    "story": ["Write a short story about a {a} {n}.", "Write a poem about the {n}.",
              "Tell a tale of the {n}."],
}
EVALS = ["The draft is good.", "The draft is too short.", "The draft needs more detail.",
         "The draft is clear but plain."]
THOUGHTS = ["The user asks about the {n}.", "I should talk about the {n}.",
            "The {n} is {a}, I think.", "Keep it simple.", "I will be clear and brief."]


def make_instruction(rng):
    category = rng.choice(list(CATEGORIES))
    n, a = rng.choice(NOUNS), rng.choice(ADJS)
    text = rng.choice(CATEGORIES[category]).format(n=n, a=a, v0=rng.choice(VERBS).removesuffix("s"),
                                                  k=rng.randint(2, 4))
    return {"instruction": text, "category": category, "noun": n, "adj": a}


def sentence(rng, n, a):
    forms = ["The {n} is {a}.", "The {n} {v} {p}.", "A {a} {n} {v}.", "Many people like the {n}.",
             "It {v} {p}.", "The {m} is {b} too."]
    return rng.choice(forms).format(n=n, a=a, v=rng.choice(VERBS), p=rng.choice(PLACES),
                                    m=rng.choice(NOUNS), b=rng.choice(ADJS))


def one(rng, ex):
    return sentence(rng, ex["noun"], ex["adj"])


def make_response(rng, ex):
    k = rng.choice([1, 1, 2, 2, 3])  # short and long responses
    return " ".join(one(rng, ex) for _ in range(k))


def make_thought(rng, ex):
    picks = rng.sample(THOUGHTS, rng.choice([1, 2]))
    return " ".join(t.format(n=ex["noun"], a=ex["adj"]) for t in picks)


# -----------------------------------------------------------------------------
# completions: well-formed or, with probability MALFORMED, broken in one of a few ways

def generic_completion(rng, ex):
    thought, response = make_thought(rng, ex), make_response(rng, ex)
    head, mark = "Here is my thought process:", "Here is my response:"
    if rng.random() >= MALFORMED:
        return f"{head} {thought} {mark} {response}"
    return rng.choice([
        f"{head} {thought} {response}",                                      # marker missing
        f"{head} {thought} {mark} {one(rng, ex)} {mark} {one(rng, ex)}",    # marker twice
        f"{head} {thought} {mark}",                                          # empty response
        f"{mark} {response} {head} {thought}",                               # out of order
    ])


def specific_completion(rng, ex):
    response = make_response(rng, ex)
    draft = response.split(". ")[0].rstrip(".") + "."
    thought = f"Draft: {draft} Evaluation: {rng.choice(EVALS)}"
    if rng.random() >= MALFORMED:
        return f"{thought} <R> {response}"
    return rng.choice([
        f"{thought} {response}",                                             # marker missing
        f"{thought} <R> {one(rng, ex)} <R> {one(rng, ex)}",                  # marker twice
        f"{thought} <R>",                                                    # empty response
    ])


def make_examples(rng, n):
    """(template, instruction, system_prompt, completion) over the three templates; a quarter of
    the thought prompts use the system-prompt variant."""
    out = []
    for _ in range(n):
        ex = make_instruction(rng)
        template = rng.choice([GENERIC, GENERIC, SPECIFIC, SPECIFIC, DIRECT])
        system = template is not DIRECT and rng.random() < 0.25
        if template is GENERIC:
            completion = generic_completion(rng, ex)
        elif template is SPECIFIC:
            completion = specific_completion(rng, ex)
        else:
            completion = make_response(rng, ex)
        out.append((template, ex["instruction"], system, completion))
    return out


# -----------------------------------------------------------------------------
# tokenizer

def train_tokenizer(examples):
    """Byte-level BPE on the synthetic text. Digits are split off before BPE, so no merge ever
    contains a digit and "0".."9" stay single tokens (the judge reads scores as digits)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = ["system user assistant"]
    for template, instruction, system, completion in examples:
        messages = build_messages(template, instruction, system)
        texts += [m["content"] for m in messages] + [completion]
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>",
                                 additional_special_tokens=["<|im_start|>"])
    hf.chat_template = CHAT_TEMPLATE
    return hf


def encode(tok, examples):
    """Token ids and a loss mask per example: the loss covers the completion and its <|im_end|>."""
    rows = []
    for template, instruction, system, completion in examples:
        prompt = tok(build_prompt(tok, template, instruction, system)).input_ids
        answer = tok(completion).input_ids + [tok.eos_token_id]
        rows.append((prompt + answer, [0] * len(prompt) + [1] * len(answer)))
    return rows


# -----------------------------------------------------------------------------
# models

def llama_config(tok, hidden, inter, heads, kv_heads, layers, tied, init=0.02):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, max_position_embeddings=512,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied,
                       initializer_range=init, bos_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def batch(rows, idx, pad_id):
    """Right-padded ids and labels. No attention mask is needed: with causal attention, real
    tokens never see the padding after them."""
    n = max(len(rows[i][0]) for i in idx)
    ids = torch.full((len(idx), n), pad_id)
    labels = torch.full((len(idx), n), -100)
    for b, i in enumerate(idx):
        x, m = map(torch.tensor, rows[i])
        ids[b, :len(x)] = x
        labels[b, :len(x)] = torch.where(m == 1, x, -100)
    return ids, labels


def train_policy(tok, rows):
    """Plain AdamW with linear warmup and cosine decay; loss on completions only."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config(tok, 128, 256, 4, 2, 2, tied=True))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, betas=(0.9, 0.98))
    gen = np.random.default_rng(SEED)
    t0 = time.time()
    for step in range(TRAIN_STEPS):
        lr = LR * min(1.0, (step + 1) / 50) * 0.5 * (1 + np.cos(np.pi * step / TRAIN_STEPS))
        for g in opt.param_groups:
            g["lr"] = lr
        ids, labels = batch(rows, gen.integers(len(rows), size=BATCH), tok.pad_token_id)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == TRAIN_STEPS - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  lr {lr:.1e}  {time.time() - t0:.0f}s")
    return model.eval()


def save_policy(model, tok, out):
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(bos_token_id=tok.pad_token_id,
                                               eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)


# -----------------------------------------------------------------------------
# judge: a random llama in GGUF, written tensor by tensor like llama.cpp's convert_hf_to_gguf.py

GGUF_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name):
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, i, rest = hf_name.split(".", 3)  # model.layers.{i}.{rest}
    return f"blk.{i}.{GGUF_NAMES[rest.removesuffix('.weight')]}.weight"


def rope_permute(w, n_head):
    """HF's rotate-half q/k layout to llama.cpp's interleaved one (convert_hf_to_gguf's permute)."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def tokenizer_vocab(tok):
    """Tokens in id order, their GGUF types (1 normal, 3 control) and the BPE merges as "a b"."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    types = [3 if t in SPECIALS else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, types, merges


def write_judge(tok, path):
    import gguf
    from transformers import LlamaForCausalLM

    torch.manual_seed(SEED + 1)
    cfg = llama_config(tok, 64, 128, 4, 4, 2, tied=False, init=JUDGE_INIT)
    model = LlamaForCausalLM(cfg)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("minitpo tiny judge (random weights)")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens, types, merges = tokenizer_vocab(tok)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.pad_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, t in model.state_dict().items():
        x = t.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            x = rope_permute(x, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            x = rope_permute(x, cfg.num_key_value_heads)
        w.add_tensor(gguf_name(name), np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# -----------------------------------------------------------------------------

def write_instructions(rng, path, n=48):
    """n distinct instructions, an equal share per category."""
    seen, rows = set(), []
    while len(rows) < n:
        ex = make_instruction(rng)
        per = sum(r["category"] == ex["category"] for r in rows)
        if ex["instruction"] in seen or per >= n // len(CATEGORIES):
            continue
        seen.add(ex["instruction"])
        rows.append({"instruction": ex["instruction"], "category": ex["category"]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main():
    t0 = time.time()
    torch.manual_seed(SEED)
    torch.set_num_threads(min(2, torch.get_num_threads()))  # fewer float reduction orders to vary
    rng = random.Random(SEED)
    examples = make_examples(rng, N_TRAIN)
    tok = train_tokenizer(examples)
    print(f"tokenizer: {len(tok)} tokens")
    model = train_policy(tok, encode(tok, examples))
    save_policy(model, tok, HERE / "policy")
    write_instructions(rng, HERE / "instructions.jsonl")
    write_judge(tok, HERE / "judge.gguf")
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
