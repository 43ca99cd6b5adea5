#!/usr/bin/env python3
"""Generate the Hugging Face parity golden files for picotron.cu (tests/golden/).

    python scripts/make_golden.py [--out tests/golden]
    python scripts/make_golden.py --out tests/golden_pattern \
        --layer-types sliding,full,full,sliding --local-attention 65

The second form gives the attention pattern only through `layer_types` (here one that no
global_attn_every_n_layers can express) and an odd `local_attention` (65: +-32 tokens).

Builds a small random transformers.ModernBertForMaskedLM (fp32, eager attention, sparse prediction),
runs one packed batch of three documents through it and records what the C++ HF-parity test compares
against. Nothing is downloaded: the model is built from a config object.

Writes
  OUT/model/config.json, OUT/model/model.safetensors   the initial weights (save_pretrained, fp32)
  OUT/golden.safetensors
      input_ids, labels, positions  int32 (T,)   the batch, packed (T = 500 = 260 + 150 + 90)
      cu_seqlens                    int32 (4,)   [0, 260, 410, 500]
      loss                          f32 (1,)     mean cross-entropy over the masked tokens
      logits                        f32 (n_masked, V)  logits of the masked rows, in packed order
      grad.<name>                   f32          d loss / d parameter, same names as model.safetensors
                                                 (the tied embedding: decoder part + lookup part)
      step_losses                   f32 (3,)     loss of each of 3 AdamW steps on this batch
      final.<name>                  f32          parameters after those 3 steps
  OUT/README.md

HF sees the batch as B=3 rows right-padded to 260 (pad id 0, attention_mask 0 on padding, labels -100
on padding, default position ids 0..S-1). The script cross-checks that view against (a) each
document run alone and (b) the packed view itself (one row of 500 tokens, position ids restarting per
document, block-diagonal 4-D masks passed straight to the layers), for loss, logits and gradients.
"""
import argparse
import math
import os
import platform
import sys

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import ModernBertConfig, ModernBertForMaskedLM

SEED = 1234
DOC_LENS = [260, 150, 90]
PAD, CLS, SEP, MASK = 0, 1, 2, 3
FIRST_REGULAR = 4  # random token ids are drawn from [4, V)
MASK_PROB = 0.30
N_STEPS = 3
ADAMW = dict(lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
WEIGHT_DECAY = 1e-5


def make_config(layer_types, local_attention):
    pattern = {"layer_types": layer_types} if layer_types else {"global_attn_every_n_layers": 3}
    cfg = ModernBertConfig(
        **pattern,
        vocab_size=384,
        hidden_size=128,
        num_attention_heads=2,  # head dim 64
        intermediate_size=64,
        num_hidden_layers=4,
        local_attention=local_attention,  # local_attention // 2 tokens each side
        global_rope_theta=160000.0,
        local_rope_theta=10000.0,
        max_position_embeddings=512,
        norm_eps=1e-5,
        norm_bias=False,
        attention_bias=False,
        mlp_bias=False,
        classifier_bias=False,
        decoder_bias=True,
        hidden_activation="gelu",
        classifier_activation="gelu",
        attention_dropout=0.0,
        embedding_dropout=0.0,
        mlp_dropout=0.0,
        classifier_dropout=0.0,
        pad_token_id=PAD,
        cls_token_id=CLS,
        sep_token_id=SEP,
        bos_token_id=CLS,
        eos_token_id=SEP,
        mask_token_id=MASK,
        sparse_prediction=True,
        sparse_pred_ignore_index=-100,
        tie_word_embeddings=True,
        initializer_range=0.02,
        initializer_cutoff_factor=2.0,
        attn_implementation="eager",
    )
    # Older transformers versions compile the MLP unless told not to; newer ones dropped the field.
    if hasattr(cfg, "reference_compile"):
        cfg.reference_compile = False
    return cfg


def check_config(cfg, layer_types, local_attention):
    """Make sure the installed transformers reads the config as the architecture we mean."""
    L = cfg.num_hidden_layers
    if hasattr(cfg, "layer_types"):
        want = layer_types or ["full_attention" if l % 3 == 0 else "sliding_attention" for l in range(L)]
        assert list(cfg.layer_types) == want, cfg.layer_types
    else:
        assert not layer_types, "this transformers has no layer_types"
    if hasattr(cfg, "rope_parameters") and cfg.rope_parameters:
        rp = cfg.rope_parameters
        assert rp["full_attention"]["rope_theta"] == 160000.0, rp
        assert rp["sliding_attention"]["rope_theta"] == 10000.0, rp
        assert rp["full_attention"]["rope_type"] == "default" and rp["sliding_attention"]["rope_type"] == "default"
    else:
        assert cfg.global_rope_theta == 160000.0 and cfg.local_rope_theta == 10000.0
        assert cfg.global_attn_every_n_layers == 3
    assert cfg.local_attention == local_attention
    assert cfg._attn_implementation == "eager", cfg._attn_implementation


def make_batch(gen, V):
    """Three documents [CLS] random [SEP], 30% of the non-special positions masked 80/10/10."""
    ids, labels = [], []
    counts = dict(mask=0, random=0, same=0)
    for n in DOC_LENS:
        orig = torch.randint(FIRST_REGULAR, V, (n,), generator=gen)
        orig[0], orig[-1] = CLS, SEP
        lab = torch.full((n,), -100, dtype=torch.long)
        inp = orig.clone()
        k = int(round(MASK_PROB * (n - 2)))
        pos = 1 + torch.randperm(n - 2, generator=gen)[:k]
        pos, _ = torch.sort(pos)
        u = torch.rand(k, generator=gen)
        rnd = torch.randint(FIRST_REGULAR, V, (k,), generator=gen)
        lab[pos] = orig[pos]
        for j in range(k):
            p = int(pos[j])
            if u[j] < 0.8:
                inp[p] = MASK
                counts["mask"] += 1
            elif u[j] < 0.9:
                inp[p] = rnd[j]
                counts["random"] += 1
            else:
                counts["same"] += 1
        ids.append(inp)
        labels.append(lab)
    return ids, labels, counts


def padded(ids, labels):
    B, S = len(ids), max(len(x) for x in ids)
    input_ids = torch.full((B, S), PAD, dtype=torch.long)
    lab = torch.full((B, S), -100, dtype=torch.long)
    attn = torch.zeros((B, S), dtype=torch.long)
    for b, (x, y) in enumerate(zip(ids, labels)):
        input_ids[b, : len(x)] = x
        lab[b, : len(y)] = y
        attn[b, : len(x)] = 1
    return input_ids, lab, attn


def packed_masks(cu, window, dtype=torch.float32):
    """Block-diagonal additive masks (1, 1, T, T) for the packed view: full and sliding-window."""
    T = int(cu[-1])
    doc = torch.zeros(T, dtype=torch.long)
    for d in range(len(cu) - 1):
        doc[cu[d] : cu[d + 1]] = d
    idx = torch.arange(T)
    same = doc[:, None] == doc[None, :]
    near = (idx[:, None] - idx[None, :]).abs() <= window
    neg = torch.finfo(dtype).min

    def additive(allowed):
        m = torch.zeros((T, T), dtype=dtype)
        m[~allowed] = neg
        return m[None, None]

    return {"full_attention": additive(same), "sliding_attention": additive(same & near)}


def grads_by_name(model, names):
    params = dict(model.named_parameters())  # tied weight appears once, under the embedding's name
    out = {}
    for n in names:
        g = params[n].grad
        out[n] = torch.zeros_like(params[n]) if g is None else g.detach().clone()
    return out


def rel_err(a, b):
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "golden"))
    ap.add_argument("--layer-types", default="", help="comma list of full/sliding, one per layer (default: every 3rd global)")
    ap.add_argument("--local-attention", type=int, default=128)
    args = ap.parse_args()
    kinds = {"full": "full_attention", "sliding": "sliding_attention"}
    layer_types = [kinds[k] for k in args.layer_types.split(",")] if args.layer_types else None
    out = os.path.abspath(args.out)
    model_dir = os.path.join(out, "model")
    os.makedirs(model_dir, exist_ok=True)

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # bitwise-reproducible CPU reductions

    # ------------------------------------------------------------------ model
    cfg = make_config(layer_types, args.local_attention)
    check_config(cfg, layer_types, args.local_attention)
    model = ModernBertForMaskedLM(cfg).float()
    model.eval()  # dropout is 0 anyway
    emb = model.model.embeddings.tok_embeddings
    assert model.decoder.weight is emb.weight, "decoder.weight must be tied to the token embedding"
    V, H = cfg.vocab_size, cfg.hidden_size
    with torch.no_grad():
        n_ln = 0
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                assert m.bias is None
                m.weight.copy_(1.0 + 0.1 * torch.randn_like(m.weight))
                n_ln += 1
        assert n_ln == 2 * cfg.num_hidden_layers - 1 + 1 + 1 + 1  # attn/mlp norms, emb, final, head
        model.decoder.bias.copy_(0.1 * torch.randn_like(model.decoder.bias))
    assert model.decoder.weight is emb.weight

    model.save_pretrained(model_dir, safe_serialization=True)
    saved = load_file(os.path.join(model_dir, "model.safetensors"))
    names = list(saved.keys())
    pnames = [n for n, _ in model.named_parameters()]
    assert sorted(names) == sorted(pnames), (sorted(names), sorted(pnames))
    for n, p in model.named_parameters():
        assert saved[n].dtype == torch.float32 and torch.equal(saved[n], p.detach()), n
    init_state = {n: p.detach().clone() for n, p in model.named_parameters()}

    # ------------------------------------------------------------------ batch
    gen = torch.Generator().manual_seed(SEED + 1)
    docs, doc_labels, counts = make_batch(gen, V)
    cu = torch.tensor([0] + list(np.cumsum(DOC_LENS)), dtype=torch.long)
    p_ids = torch.cat(docs)
    p_labels = torch.cat(doc_labels)
    p_pos = torch.cat([torch.arange(n) for n in DOC_LENS])
    T = int(cu[-1])
    n_masked = int((p_labels != -100).sum())
    assert p_ids.min() >= 0 and p_ids.max() < V
    assert all(int(p_ids[cu[d]]) == CLS and int(p_ids[cu[d + 1] - 1]) == SEP for d in range(len(DOC_LENS)))
    print(f"batch: {T} tokens in {len(DOC_LENS)} documents {DOC_LENS}, {n_masked} masked "
          f"({counts['mask']} [MASK], {counts['random']} random, {counts['same']} unchanged)")

    input_ids, labels, attention_mask = padded(docs, doc_labels)

    # ------------------------------------------------------------------ reference: padded HF batch
    model.zero_grad(set_to_none=True)
    outp = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    loss = outp.loss
    loss.backward()
    logits = outp.logits.detach().clone()  # sparse prediction: rows of labels != -100, row-major over (B, S)
    assert logits.shape == (n_masked, V), logits.shape
    grads = grads_by_name(model, names)
    # Row-major order over the right-padded (B, S) batch is document 0 first, increasing position:
    # the packed order. Check it by recomputing the logits in packed order from the hidden states.
    with torch.no_grad():
        hid = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        packed_hidden = torch.cat([hid[b, :n] for b, n in enumerate(DOC_LENS)])
        mrows = packed_hidden[p_labels != -100]
        logits_packed_order = model.decoder(model.head(mrows))
        e = rel_err(logits_packed_order, logits)
        print(f"check packed order of stored logits: max rel diff {e:.2e}")
        assert e < 1e-5
        ce = torch.nn.functional.cross_entropy(logits, p_labels[p_labels != -100])
        assert abs(ce.item() - loss.item()) < 1e-6 * max(1.0, abs(loss.item()))

    # ------------------------------------------------------------------ check: each document alone
    with torch.no_grad():
        per_doc = []
        for x, y in zip(docs, doc_labels):
            o = model(input_ids=x[None], labels=y[None])
            per_doc.append(o.logits)
        e = rel_err(torch.cat(per_doc), logits)
        print(f"check documents one at a time vs padded batch: logits max rel diff {e:.2e}")
        assert e < 1e-4

    # ------------------------------------------------------------------ check: the packed view itself
    model.zero_grad(set_to_none=True)
    masks = packed_masks(cu, cfg.local_attention // 2)
    outk = model(input_ids=p_ids[None], attention_mask=masks, position_ids=p_pos[None], labels=p_labels[None])
    outk.loss.backward()
    gk = grads_by_name(model, names)
    e_logit = rel_err(outk.logits.detach(), logits)
    e_grad = max(rel_err(gk[n], grads[n]) for n in names)
    print(f"check packed view (1x{T}, block-diagonal masks, restarting positions) vs padded batch: "
          f"loss {outk.loss.item():.7f} vs {loss.item():.7f}, logits max rel diff {e_logit:.2e}, "
          f"grads max rel diff {e_grad:.2e}")
    assert abs(outk.loss.item() - loss.item()) < 1e-5 and e_logit < 1e-4 and e_grad < 1e-3
    model.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ 3 AdamW steps from the saved weights
    m2 = ModernBertForMaskedLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    m2.eval()
    assert m2.decoder.weight is m2.model.embeddings.tok_embeddings.weight
    for n, p in m2.named_parameters():
        assert torch.equal(p.detach(), init_state[n]), f"reloaded {n} differs"
    decay = [p for n, p in m2.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in m2.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        foreach=False, **ADAMW,
    )
    step_losses = []
    for k in range(N_STEPS):
        opt.zero_grad(set_to_none=True)
        o = m2(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        o.loss.backward()
        if k == 0:
            g0 = grads_by_name(m2, names)
            assert max(rel_err(g0[n], grads[n]) for n in names) < 1e-5
        opt.step()
        step_losses.append(o.loss.item())
    print("step losses:", " ".join(f"{x:.7f}" for x in step_losses))
    assert abs(step_losses[0] - loss.item()) < 1e-6
    final = {n: p.detach().clone() for n, p in m2.named_parameters()}

    # ------------------------------------------------------------------ write
    golden = {
        "input_ids": p_ids.to(torch.int32),
        "labels": p_labels.to(torch.int32),
        "positions": p_pos.to(torch.int32),
        "cu_seqlens": cu.to(torch.int32),
        "loss": torch.tensor([loss.item()], dtype=torch.float32),
        "logits": logits.float(),
        "step_losses": torch.tensor(step_losses, dtype=torch.float32),
    }
    for n in names:
        golden["grad." + n] = grads[n].float()
        golden["final." + n] = final[n].float()
    golden = {k: v.contiguous() for k, v in golden.items()}
    gpath = os.path.join(out, "golden.safetensors")
    # one metadata key only: several keys are written in random order, which breaks byte-identical reruns
    save_file(golden, gpath, metadata={
        "producer": f"scripts/make_golden.py seed={SEED} torch={torch.__version__} "
                    f"transformers={transformers.__version__}",
    })

    for p in (gpath, os.path.join(model_dir, "model.safetensors")):
        os.chmod(p, 0o644)  # safetensors writes 0600

    # ------------------------------------------------------------------ stats
    print("\nmodel.safetensors parameters:")
    for n in names:
        print(f"  {n:45s} {str(tuple(saved[n].shape)):12s} max|w| {saved[n].abs().max().item():.4e}")
    print("\ngolden.safetensors:")
    for k, v in golden.items():
        s = f"max|v| {v.abs().max().item():.4e}" if v.is_floating_point() else f"range [{int(v.min())}, {int(v.max())}]"
        print(f"  {k:50s} {str(v.dtype):14s} {str(tuple(v.shape)):12s} {s}")
    print(f"\nloss {loss.item():.7f} (ln V = {math.log(V):.4f}), n_masked {n_masked}")
    total = 0
    for root, _, files in os.walk(out):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    for rel in ("model/config.json", "model/model.safetensors", "golden.safetensors"):
        print(f"  {rel}: {os.path.getsize(os.path.join(out, rel)):,} bytes")

    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(f"""# HF parity golden files

Produced by `python scripts/make_golden.py` (seed {SEED}, CPU, fp32, 1 thread) with
torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}.

- `model/` — `save_pretrained` of a random `ModernBertForMaskedLM` (V={V}, H={H}, I={cfg.intermediate_size},
  L={cfg.num_hidden_layers}, 2 heads of 64, layer types {list(cfg.layer_types)} (global θ=160000, local θ=10000,
  ±{cfg.local_attention // 2}; `layer_types` {"given" if layer_types else "from global_attn_every_n_layers=3"}),
  eager attention, sparse prediction, tied decoder). LayerNorm weights are 1 + 0.1·randn and the decoder
  bias 0.1·randn so that their gradients are not trivial. `decoder.weight` is not stored (tied to
  `model.embeddings.tok_embeddings.weight`).
- `golden.safetensors` — one packed batch of documents of lengths {DOC_LENS} ({T} tokens,
  `cu_seqlens` {cu.tolist()}, `positions` restart at 0 per document, {n_masked} masked tokens;
  ids: PAD {PAD}, CLS {CLS}, SEP {SEP}, MASK {MASK}); `loss` (mean CE over masked tokens), `logits` of
  the masked rows in packed order, `grad.<name>` for every parameter (the tied embedding's gradient
  is decoder part + lookup part), `step_losses` and `final.<name>` after {N_STEPS} steps of
  `torch.optim.AdamW(lr=1e-3, betas=(0.9, 0.98), eps=1e-6)` with weight decay {WEIGHT_DECAY} on
  parameters with dim >= 2 and 0 on 1-D ones, no clipping, no schedule, same batch every step.

HF saw the batch as 3 right-padded rows; the script checks that this equals running each document
alone and running the packed row with block-diagonal masks and restarting positions.
Total size {total/1e6:.2f} MB.
""")
    print(f"wrote {out} ({total/1e6:.2f} MB incl. README)")


if __name__ == "__main__":
    main()
