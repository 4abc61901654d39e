"""Reference answers written in the tests, from a transformers model's eager outputs, for tasks transformers has no
pipeline for (question answering left transformers 5): never from neuronserve's own decode."""
from __future__ import annotations

import torch


def qa_answer(model, tokenizer, question, context, max_answer_len=15):
    """The pipeline's answer, decoded here from the eager logits: softmax over the context tokens and CLS, the
    best span of at most max_answer_len tokens, cut from the context by the tokenizer's offsets."""
    enc = tokenizer(question, context, return_offsets_mapping=True, return_tensors="pt")
    offsets = enc.pop("offset_mapping")[0].tolist()
    with torch.no_grad():
        out = model(**enc)
    seq = enc.sequence_ids(0)
    keep = [i for i, s in enumerate(seq) if s == 1 or enc["input_ids"][0, i] == tokenizer.cls_token_id]
    context_tokens = [i for i in keep if seq[i] == 1]
    ps = torch.softmax(out.start_logits[0, keep].double(), 0)
    pe = torch.softmax(out.end_logits[0, keep].double(), 0)
    prob = dict(zip(keep, zip(ps.tolist(), pe.tolist())))
    best = max(((prob[i][0] * prob[j][1], -i, -j) for i in context_tokens for j in context_tokens
                if 0 <= j - i < max_answer_len))
    score, i, j = best[0], -best[1], -best[2]
    start, end = offsets[i][0], offsets[j][1]
    return {"answer": context[start:end], "score": score, "start": start, "end": end}
