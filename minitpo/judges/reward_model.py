"""Reward-model judge (docs/method.md step 4, pointwise, as the paper's ArmoRM): a transformers sequence classifier.

Consumes: a `JudgeConfig` (type reward_model; model = Hub id or local folder of any
`AutoModelForSequenceClassification` with one output, e.g. Skywork-Reward-V2-Qwen3-0.6B) and parallel
lists of instructions and responses. Produces: one raw float per response, the classifier's logit at the
last real token of (instruction, response) rendered as a [user, assistant] chat. The model is loaded
per call and released before returning, so training gets the memory back.
"""


import torch
from tqdm import tqdm

from minitpo.device import default_dtype, free_memory, nf4_config, pick_device
from minitpo.errors import UserError


def load_reward_model(cfg, device: str):
    """(tokenizer, model) in eval mode: bf16 on CUDA, fp32 on CPU, 4-bit NF4 when cfg.quantization == "nf4"."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from minitpo.model import quiet_libraries

    quiet_libraries()
    dtype = default_dtype(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        if cfg.quantization == "nf4":
            model = AutoModelForSequenceClassification.from_pretrained(
                cfg.model, quantization_config=nf4_config(dtype), dtype=dtype, device_map={"": device})
        else:
            model = AutoModelForSequenceClassification.from_pretrained(cfg.model, dtype=dtype).to(device)
    except OSError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"judge.model: {cfg.model} could not be loaded as a reward model ({first_line}); "
                        "give a Hub id or a local folder of an AutoModelForSequenceClassification") from None
    if model.config.num_labels < 1:
        raise UserError(f"judge.model: {cfg.model} has no classification output; use a reward model")
    # Padding. The classifier pools the rightmost token that is not pad_token_id (transformers'
    # sequence-classification heads), so pad_token_id must be set on the model config and be the id we
    # pad with. We pad on the right: positions then match an unpadded forward exactly.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    assert tokenizer.pad_token_id is not None, f"{cfg.model}: tokenizer has no pad, eos or unk token"
    tokenizer.padding_side = "right"
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id  # what the head reads
    model.eval()
    return tokenizer, model


def render(tokenizer, instruction: str, response: str) -> tuple[str, bool]:
    """(text, add_special_tokens): the chat template over [user, assistant] with no generation prompt
    when the tokenizer has one (the template writes BOS itself), else plain text."""
    if tokenizer.chat_template:
        chat = [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False), False
    return f"User: {instruction}\n\nAssistant: {response}", True


@torch.no_grad()
def score_batch(tokenizer, model, texts: list[str], add_special_tokens: bool) -> list[float]:
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    ids, mask = enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device)
    last = ids[torch.arange(len(ids)), mask.sum(1) - 1]  # (B,) last real token of each row
    if (last == tokenizer.pad_token_id).any():
        # e.g. pad = eos and the template ends with eos: pooling would skip that real token. Score such
        # inputs one at a time, unpadded, where the head pools position -1 when pad_token_id is None.
        return [_score_unpadded(model, ids[i, : int(mask[i].sum())]) for i in range(len(ids))]
    logits = model(input_ids=ids, attention_mask=mask).logits  # (B, num_labels)
    return logits[:, 0].float().cpu().tolist()


def _score_unpadded(model, ids: torch.Tensor) -> float:
    text_config = model.config.get_text_config()
    saved = text_config.pad_token_id
    text_config.pad_token_id = None
    try:
        return float(model(input_ids=ids[None]).logits[0, 0].float())
    finally:
        text_config.pad_token_id = saved


def score_responses(cfg, instructions: list[str], responses: list[str], progress: bool = True) -> list[dict]:
    """One dict(score, score_mass=None) per (instruction, response), in cfg.batch_size batches."""
    assert len(instructions) == len(responses), f"{len(instructions)} instructions, {len(responses)} responses"
    if not responses:
        return []
    tokenizer, model = load_reward_model(cfg, pick_device())
    try:
        rendered = [render(tokenizer, i, r) for i, r in zip(instructions, responses)]
        scores = []
        with tqdm(total=len(responses), desc="judge", unit="resp", disable=not progress) as bar:
            for start in range(0, len(rendered), cfg.batch_size):
                chunk = rendered[start:start + cfg.batch_size]
                scores += score_batch(tokenizer, model, [t for t, _ in chunk], chunk[0][1])
                bar.update(len(chunk))
        return [{"score": s, "score_mass": None} for s in scores]
    finally:
        del model
        free_memory()
