"""llama.cpp's batched decode on this CPU: the peer figure for minitpo's sampler (benchmarks/sample.py).

B sequences decode together, as minitpo's engine decodes its slots: one `llama_decode` per step
carrying one token of each sequence (its own seq_id, its own KV cells), then one draw per sequence
from llama.cpp's own sampler chain (temperature 0.8, top-p 0.95, as the demo). Prompts are random
token ids of one length, prefilled before the clock starts. Prints decode tokens/s.

    minitpo export runs/demo/iter-2 /tmp/demo-f32.gguf --gguf --type f32   # the demo's model, fp32
    python benchmarks/llama_batched.py /tmp/demo-f32.gguf --batch 128 --prompt-len 128 --new-tokens 64

Use the same --batch/--prompt-len/--new-tokens as sample.py. --type f32 compares like for like with
the engine's float32 copy on CPU; f16 or the package's Q4_1 show what quantized weights buy.
"""

import argparse
import os
import random
import time

import llama_cpp as L


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repack", action="store_true",
                    help="let llama.cpp repack weights for the CPU (off: it crashed on some AMX machines)")
    args = ap.parse_args()
    B, P, N = args.batch, args.prompt_len, args.new_tokens

    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    mparams.use_extra_bufts = args.repack
    model = L.llama_model_load_from_file(args.gguf.encode(), mparams)
    assert model, f"llama.cpp could not load {args.gguf}"
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    cparams = L.llama_context_default_params()
    cparams.n_ctx = B * (P + N)  # every sequence's cells
    cparams.n_batch = cparams.n_ubatch = max(B, 512)
    cparams.n_seq_max = B
    cparams.kv_unified = False  # each sequence attends to its own cells only, as the engine's slots do
    cparams.n_threads = cparams.n_threads_batch = args.threads
    ctx = L.llama_init_from_model(model, cparams)
    assert ctx, "llama.cpp could not create the context"

    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(0.8))
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(0.95, 1))
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(0))
    batch = L.llama_batch_init(cparams.n_batch, 0, 1)

    def decode(items):  # items: (token, pos, seq, wants_logits)
        for k, (token, pos, seq, logits) in enumerate(items):
            batch.token[k], batch.pos[k], batch.n_seq_id[k], batch.logits[k] = token, pos, 1, logits
            batch.seq_id[k][0] = seq
        batch.n_tokens = len(items)
        assert L.llama_decode(ctx, batch) == 0, "llama_decode failed"

    rng = random.Random(0)
    prompts = [[rng.randrange(100, vocab) for _ in range(P)] for _ in range(B)]
    t0 = time.perf_counter()
    items = [(tok, pos, s, pos == P - 1) for s, p in enumerate(prompts) for pos, tok in enumerate(p)]
    nxt = {}  # seq -> its first new token, drawn from the logits of the decode that ended its prompt
    for start in range(0, len(items), cparams.n_batch):
        chunk = items[start:start + cparams.n_batch]
        decode(chunk)
        nxt.update({seq: L.llama_sampler_sample(chain, ctx, k) for k, (_, _, seq, logits) in enumerate(chunk) if logits})
    prefill_s = time.perf_counter() - t0

    tokens = [nxt[s] for s in range(B)]
    t0 = time.perf_counter()
    for step in range(N - 1):  # the first new token came from the prefill's logits
        decode([(tokens[s], P + step, s, True) for s in range(B)])
        tokens = [L.llama_sampler_sample(chain, ctx, s) for s in range(B)]
    decode_s = time.perf_counter() - t0
    n_decoded = B * (N - 1)
    print(f"llama.cpp {L.__version__} {os.path.basename(args.gguf)} batch={B} prompt_len={P} new_tokens={N} "
          f"threads={args.threads}")
    print(f"prefill {B * P} tokens in {prefill_s:.2f} s ({B * P / prefill_s:,.0f} tok/s); "
          f"decode {n_decoded} tokens in {decode_s:.2f} s: {n_decoded / decode_s:,.0f} tok/s")
    L.llama_batch_free(batch)
    L.llama_sampler_free(chain)
    L.llama_free(ctx)
    L.llama_model_free(model)


if __name__ == "__main__":
    main()
