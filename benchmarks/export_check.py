"""How close the GGUF exports of a trained iteration are to the model minitpo trained, in llama.cpp.

    python benchmarks/export_check.py runs/demo/iter-2 [--out DIR] [--prompts 4]

Exports PATH with `--gguf --type f16`, `--gguf --type q8_0` and `--gguf-lora`, then compares llama.cpp's
next-token log-probabilities with transformers + the adapter (float32) at every position of a few
held-out prompts, built as training builds them (the run's thought template, the chat template):
max |log p difference| over the vocabulary, max and mean KL(transformers || llama.cpp), top-1
agreement. llama.cpp runs with an f32 KV cache (the file is measured, not the cache), and once with
its default f16 cache for the f16 file. The LoRA file is applied to the policy's own base GGUF when
the policy came from one. Ends with a short sample from the f16 file through its chat template.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minitpo.export import export_gguf  # noqa: E402
from minitpo.llamacpp import no_weight_repacking, quiet_stderr  # noqa: E402
from minitpo.prompts import build_prompt  # noqa: E402
from minitpo.rundir import resolve_adapter  # noqa: E402


def llama(path, lora=None, kv=0, n_ctx=1024):
    from llama_cpp import Llama

    with quiet_stderr(), no_weight_repacking():
        return Llama(model_path=str(path), lora_path=None if lora is None else str(lora), n_ctx=n_ctx,
                     logits_all=True, verbose=False, type_k=kv, type_v=kv)


def llama_logprobs(llm, ids):
    llm.reset()
    llm.eval(ids)
    return torch.log_softmax(torch.tensor(np.array(llm.scores[:len(ids)]), dtype=torch.float64), -1)


def stats(pairs):
    got = torch.cat([g for g, _ in pairs])
    want = torch.cat([w for _, w in pairs])
    kl = (want.exp() * (want - got)).sum(-1)
    return (f"max |dlogp| {float((got - want).abs().max()):.2e}  KL max {float(kl.max()):.2e} "
            f"mean {float(kl.mean()):.2e}  top-1 {float((got.argmax(-1) == want.argmax(-1)).double().mean()):.3f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--out", default=None)
    ap.add_argument("--prompts", type=int, default=4)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="export-check-"))
    out.mkdir(parents=True, exist_ok=True)
    resolved = resolve_adapter(args.path)
    print(f"policy: {resolved.policy.model}  template: {resolved.template.name}  out: {out}")

    files = {}
    for name, kw in (("f16", dict(qtype="f16")), ("q8_0", dict(qtype="q8_0")), ("lora", dict(lora=True))):
        t0 = time.perf_counter()
        files[name] = export_gguf(args.path, out / f"{name}.gguf", **kw)
        print(f"export {name}: {files[name].stat().st_size / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f} s")

    import dataclasses

    from minitpo.io import read_jsonl
    from minitpo.model import load_policy

    policy = dataclasses.replace(resolved.policy, quantization="none", dtype="float32")
    model, tokenizer = load_policy(policy, resolved.adapter_dir, device="cpu")
    model.eval()
    run_dir = Path(args.path).parent
    held_out = run_dir / "held_out.jsonl"
    texts = [r["text"] for r in read_jsonl(held_out)][:args.prompts] if held_out.is_file() else \
        ["Explain why the sky is blue. Use at most 3 sentences."]
    prompts = [build_prompt(tokenizer, resolved.template, t) for t in texts]
    # the prompt and the first 40 tokens transformers would write, so that response positions count too
    seqs = []
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=False).input_ids
        with torch.no_grad():
            seqs.append(model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[0].tolist())
    with torch.no_grad():
        want = [torch.log_softmax(model(input_ids=torch.tensor([s])).logits[0].double(), -1) for s in seqs]
    print(f"{len(seqs)} sequences, {sum(map(len, seqs))} positions")

    runs = [("f16", files["f16"], None, 0), ("f16, f16 KV cache", files["f16"], None, 1),
            ("q8_0", files["q8_0"], None, 0)]
    base = resolved.policy.model if resolved.policy.model.endswith(".gguf") else None
    if base:
        runs.append((f"lora on {Path(base).name}", base, files["lora"], 0))
        runs.append((f"{Path(base).name} alone (no adapter)", base, None, 0))
    for label, path, lora, kv in runs:
        llm = llama(path, lora, kv)
        print(f"{label:>40}: {stats([(llama_logprobs(llm, s), w) for s, w in zip(seqs, want)])}")
        llm.close()

    llm = llama(files["f16"], kv=1, n_ctx=2048)
    with quiet_stderr():
        reply = llm.create_chat_completion(
            messages=[{"role": "user", "content": resolved.template.text.replace("{instruction}", texts[0])}],
            max_tokens=120, temperature=0.0, seed=0)
    print(f"\nllama.cpp sample (f16, greedy) for: {texts[0]}\n{reply['choices'][0]['message']['content']}")


if __name__ == "__main__":
    main()
