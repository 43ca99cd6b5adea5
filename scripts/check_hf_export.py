"""Cross-check picotron's HF export and --dump against transformers.

    ./picotron_cpu --steps 1 --lr 0 --dump /tmp/d --export /tmp/m   # weights unchanged by the step
    python scripts/check_hf_export.py /tmp/m /tmp/d/dump.safetensors

Loads the exported directory with AutoModelForMaskedLM.from_pretrained (fp32, eager attention),
runs the dumped micro-batch (each packed document as its own row) and compares the loss and the
embedding gradient with the dump. Exits 1 when the loss differs by more than 1e-5 relative.
"""
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM


def main():
    model_dir, dump_path = sys.argv[1], sys.argv[2]
    model = AutoModelForMaskedLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    model.config.sparse_prediction = False
    dump = load_file(dump_path)
    ids, labels, cu = dump["input_ids"].long(), dump["labels"].long(), dump["cu_seqlens"].long()
    docs = [(int(cu[d]), int(cu[d + 1])) for d in range(len(cu) - 1)]
    S = max(e - s for s, e in docs)
    B = len(docs)
    pad = model.config.pad_token_id
    input_ids = torch.full((B, S), pad, dtype=torch.long)
    attn = torch.zeros((B, S), dtype=torch.long)
    lab = torch.full((B, S), -100, dtype=torch.long)
    for b, (s, e) in enumerate(docs):
        input_ids[b, : e - s] = ids[s:e]
        attn[b, : e - s] = 1
        lab[b, : e - s] = labels[s:e]
    out = model(input_ids=input_ids, attention_mask=attn, labels=lab)
    out.loss.backward()
    ours = float(dump["loss"][0])
    theirs = out.loss.item()
    rel = abs(ours - theirs) / abs(theirs)
    g_theirs = model.model.embeddings.tok_embeddings.weight.grad
    g_ours = dump["grad.model.embeddings.tok_embeddings.weight"]
    g_rel = float((g_ours - g_theirs).abs().max() / g_theirs.abs().max())
    print(f"loss ours {ours:.7f} transformers {theirs:.7f} rel {rel:.2e}; embedding grad rel {g_rel:.2e}")
    sys.exit(0 if rel <= 1e-5 and g_rel <= 1e-4 else 1)


if __name__ == "__main__":
    main()
