"""Cross-check picotron's HF export and --dump against transformers.

    ./picotron_cpu --steps 1 --lr 0 --dump /tmp/d --export /tmp/m   # weights unchanged by the step
    python scripts/check_hf_export.py /tmp/m /tmp/d/dump.safetensors

Works for a dump written under any layout (--grad-accum, --dp, --zero 1): the dump holds step 1's
whole global batch, every micro-batch in sample order. Loads the exported directory with
AutoModelForMaskedLM.from_pretrained (fp32, eager attention), runs every packed document of every
micro-batch as its own row, and compares the loss (mean over all masked tokens) and every
gradient with the dump. Exits 1 when the loss differs by more than 1e-5 relative or a gradient by
more than 1e-4 (max |diff| / max |grad|).
"""
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM


def documents(dump):
    """(micro-batch, start, end) of every non-empty document, in order."""
    cu = dump["cu_seqlens"].long()
    if cu.dim() == 1:  # a dump of one micro-batch from an older build
        cu = cu.unsqueeze(0)
    docs = []
    for k in range(cu.shape[0]):
        for d in range(cu.shape[1] - 1):
            s, e = int(cu[k, d]), int(cu[k, d + 1])
            if e > s:
                docs.append((k, s, e))
    return docs


def main():
    model_dir, dump_path = sys.argv[1], sys.argv[2]
    model = AutoModelForMaskedLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    model.config.sparse_prediction = False
    dump = load_file(dump_path)
    ids, labels = dump["input_ids"].long(), dump["labels"].long()
    if ids.dim() == 1:
        ids, labels = ids.unsqueeze(0), labels.unsqueeze(0)
    docs = documents(dump)
    S = max(e - s for _, s, e in docs)
    B = len(docs)
    pad = model.config.pad_token_id
    input_ids = torch.full((B, S), pad, dtype=torch.long)
    attn = torch.zeros((B, S), dtype=torch.long)
    lab = torch.full((B, S), -100, dtype=torch.long)
    for b, (k, s, e) in enumerate(docs):
        input_ids[b, : e - s] = ids[k, s:e]
        attn[b, : e - s] = 1
        lab[b, : e - s] = labels[k, s:e]
    out = model(input_ids=input_ids, attention_mask=attn, labels=lab)
    out.loss.backward()
    ours = float(dump["loss"][0])
    theirs = out.loss.item()
    rel = abs(ours - theirs) / abs(theirs)
    worst_name, worst = "", 0.0
    for name, p in model.named_parameters():
        key = "grad." + name
        if key not in dump:
            if name == "decoder.weight":  # tied: its gradient is inside the embedding's
                continue
            print(f"the dump has no {key}")
            sys.exit(1)
        g_theirs = p.grad
        g_rel = float((dump[key] - g_theirs).abs().max() / g_theirs.abs().max().clamp_min(1e-30))
        if g_rel > worst:
            worst_name, worst = name, g_rel
    n_micro = ids.shape[0]
    print(f"{n_micro} micro-batch(es), {B} documents: loss ours {ours:.7f} transformers {theirs:.7f} rel {rel:.2e}; "
          f"worst gradient {worst_name} rel {worst:.2e}")
    sys.exit(0 if rel <= 1e-5 and worst <= 1e-4 else 1)


if __name__ == "__main__":
    main()
