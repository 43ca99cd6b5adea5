#!/usr/bin/env python3
"""The PyTorch baseline of `make bench`: transformers' ModernBertForMaskedLM trained on B × S tokens.

    python3 scripts/bench_torch.py --batch 16 --seq 1024                       # base on the GPU
    python3 scripts/bench_torch.py --device cpu --hidden 64 --intermediate 96 --layers 2 --heads 1 \\
        --batch 2 --seq 128 --steps 2 --warmup-steps 1 --no-compile           # smoke test on a CPU

The model is picotron's `base` preset with the fields picotron.cu's write_hf_config exports
(ModernBERT-base: H 768, I 1152, 22 layers, 12 heads, a global layer every 3rd, local window 128,
RoPE θ 160000 / 10000, no biases but the decoder's), built locally (no hub), sdpa attention and
sparse prediction (the head runs on the masked tokens only, as picotron's does). fp32 master
weights, bf16 autocast, torch.compile (unless --no-compile), AdamW (fused where the device has it).
Each step gets fresh random documents ([CLS] … [SEP], ordinary ids) masked as data.h masks: 30% of
the ordinary tokens, of those 80% [MASK], 10% a random id, 10% kept; labels −100 elsewhere.
The step time (synchronized) covers zero_grad, forward, backward and optimizer; tokens/s counts
every token of the batch, as picotron's tokens_per_s counts every real token (the batch has no padding).
Prints a summary and one line "BENCH_TORCH {json}" for scripts/bench_gpu.py.
"""
import argparse
import json
import statistics
import time

RESULT = "BENCH_TORCH "
# ModernBERT's special ids (data.h kModernBertSpecialIds); documents draw ids below ORDINARY_BELOW
UNK, CLS, SEP, PAD, MASK = 50280, 50281, 50282, 50283, 50284
ORDINARY_BELOW = 16000
WEIGHT_DECAY = 1e-5  # picotron's --weight-decay default, on matrices only


def modernbert_config(a):
    """The fields picotron.cu's write_hf_config writes, for the given shape (base by default)."""
    from transformers import ModernBertConfig

    layer_types = ["full_attention" if l % 3 == 0 else "sliding_attention" for l in range(a.layers)]
    fields = {
        "architectures": ["ModernBertForMaskedLM"], "model_type": "modernbert",
        "vocab_size": a.vocab, "hidden_size": a.hidden, "intermediate_size": a.intermediate,
        "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
        "global_attn_every_n_layers": 3, "local_attention": 128,
        "global_rope_theta": 160000.0, "local_rope_theta": 10000.0, "norm_eps": 1e-5,
        "initializer_range": 0.02, "initializer_cutoff_factor": 2.0,
        "pad_token_id": PAD, "cls_token_id": CLS, "sep_token_id": SEP, "bos_token_id": CLS, "eos_token_id": SEP,
        "mask_token_id": MASK, "unk_token_id": UNK,
        "hidden_activation": "gelu", "classifier_activation": "gelu",
        "norm_bias": False, "attention_bias": False, "mlp_bias": False, "classifier_bias": False,
        "decoder_bias": True, "tie_word_embeddings": True,
        "attention_dropout": 0.0, "embedding_dropout": 0.0, "mlp_dropout": 0.0, "classifier_dropout": 0.0,
        "max_position_embeddings": 8192, "torch_dtype": "float32", "layer_types": layer_types,
        # not in picotron's export: its head is sparse (masked rows only), so torch's must be too
        "sparse_prediction": True,
    }
    # from_dict reads the legacy rope fields as from_pretrained does (bench_cpu.py loads picotron's export that way)
    return ModernBertConfig.from_dict(fields, attn_implementation="sdpa")


def masked_batch(torch, batch, seq, device, g):
    """Random [CLS] … [SEP] documents masked as data.h does; returns (input_ids, labels, masked count)."""
    ids = torch.randint(0, ORDINARY_BELOW, (batch, seq), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    chosen = (torch.rand(ids.shape, generator=g) < 0.3) & (ids != CLS) & (ids != SEP)
    labels = torch.where(chosen, ids, -100)
    r = torch.rand(ids.shape, generator=g)
    ids = torch.where(chosen & (r < 0.8), MASK, ids)
    ids = torch.where(chosen & (r >= 0.8) & (r < 0.9), torch.randint(0, UNK, ids.shape, generator=g), ids)
    return ids.to(device), labels.to(device), int(chosen.sum())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=16, help="documents per step (default 16)")
    p.add_argument("--seq", type=int, default=1024, help="tokens per document (default 1024)")
    p.add_argument("--steps", type=int, default=20, help="measured steps (default 20)")
    p.add_argument("--warmup-steps", type=int, default=10, help="untimed steps first, compilation included (default 10)")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=1152)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50368)
    p.add_argument("--no-compile", action="store_true", help="eager mode (CPU smoke tests)")
    a = p.parse_args()
    if a.steps < 1 or a.warmup_steps < 0 or a.seq < 3:
        p.error("--steps must be >= 1, --warmup-steps >= 0, --seq >= 3")

    import torch
    import transformers
    from transformers import ModernBertForMaskedLM

    device = torch.device(a.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(modernbert_config(a)).float().to(device).train()
    decay = [q for q in model.parameters() if q.dim() >= 2]
    no_decay = [q for q in model.parameters() if q.dim() < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    try:  # fused: one kernel for every tensor's update (the fair comparison to picotron's single AdamW pass)
        opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, fused=True)
        fused = True
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
        fused = False
    # The sparse head selects the masked rows (a data-dependent shape): dynamo breaks the graph there and
    # compiles both sides; the warm-up steps absorb the compilations (and a recompile for a dynamic count).
    step_model = model if a.no_compile else torch.compile(model)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    g = torch.Generator().manual_seed(1)
    mask = torch.ones(a.batch, a.seq, dtype=torch.long, device=device)
    step_s, masked = [], []
    for step in range(a.warmup_steps + a.steps):
        ids, labels, n_masked = masked_batch(torch, a.batch, a.seq, device, g)
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            loss = step_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        sync()
        step_s.append(time.perf_counter() - t0)
        masked.append(n_masked)
        if step == 0 or step == a.warmup_steps - 1 or step == a.warmup_steps + a.steps - 1:
            print(f"step {step + 1}: loss {loss.item():.4f}, {step_s[-1] * 1e3:.1f} ms", flush=True)

    median_s = statistics.median(step_s[a.warmup_steps:])
    result = {
        "batch": a.batch, "seq": a.seq, "tokens": a.batch * a.seq, "steps": a.steps, "warmup_steps": a.warmup_steps,
        "step_ms": median_s * 1e3, "tokens_per_s": a.batch * a.seq / median_s,
        "masked_tokens_mean": statistics.mean(masked[a.warmup_steps:]),
        "peak_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
        "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20 if cuda else None,
        "compiled": not a.no_compile, "fused_adamw": fused, "loss": loss.item(),
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    print(f"torch: {a.batch}×{a.seq}: median {result['step_ms']:.1f} ms/step over {a.steps} steps after "
          f"{a.warmup_steps} warm-up, {result['tokens_per_s']:.0f} tokens/s")
    print(RESULT + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
