"""Align vocabulary-indexed rows (embeddings, lm_head) across models by token string.

Rows a model lacks are filled as mergekit 0.1.5 does: from the only model that
has the token, else from the base if it has it, else the mean over the models
that have it (zeros if none).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import InputError


@dataclass
class VocabAlignment:
    tokenizer: object  # the output tokenizer (transformers), saved with the model
    size: int  # output vocabulary size (rows)
    sources: list[torch.Tensor]  # per input model: source row of each output row, -1 if absent
    fill_from: torch.Tensor  # per output row: input index to copy a missing row from, -1: mean, -2: zero

    def align(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Permute/fill rows of each model's tensor into the output vocabulary."""
        out_shape = (self.size, *tensors[0].shape[1:])
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        present = [src >= 0 for src in self.sources]
        fill = torch.zeros(out_shape, dtype=dtype)
        needs_fill = ~torch.stack(present).all(dim=0)
        rows = needs_fill.nonzero().flatten().tolist()
        for row in rows:
            donor = int(self.fill_from[row])
            if donor >= 0:
                fill[row] = tensors[donor][self.sources[donor][row]]
            elif donor == -1:
                have = [i for i in range(len(tensors)) if present[i][row]]
                fill[row] = sum(tensors[i][self.sources[i][row]].to(dtype) for i in have) / len(have)
        result = []
        for t, src, has in zip(tensors, self.sources, present):
            aligned = fill.clone()
            aligned[has] = t[src[has]].to(dtype)
            result.append(aligned)
        return result


def _load_tokenizer(path: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer  # deferred: transformers takes seconds to import; only vocabulary merges need it

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise InputError(
            f"{path}: cannot load its tokenizer ({type(e).__name__}: {e}); tokenizer_source needs "
            "tokenizer files in every input model folder"
        ) from None


def build_alignment(
    source: str,
    model_paths: list[Path],
    rows: list[int],
    base: Optional[int],
    trust_remote_code: bool = False,
) -> VocabAlignment:
    """`source` is "base", "union" or the index (as text) of the model whose tokenizer to use.

    `rows[i]` is the number of embedding rows model i has (tokens with larger ids are padding).
    """
    tokenizers = [_load_tokenizer(p, trust_remote_code) for p in model_paths]
    base_i = base if base is not None else 0
    if source == "base":
        out_tok = tokenizers[base_i]
    elif source == "union":
        out_tok = copy.deepcopy(tokenizers[base_i])
        have = set(out_tok.get_vocab())
        for i, tok in enumerate(tokenizers):
            if i == base_i:
                continue
            added = {t.content for t in tok.added_tokens_decoder.values()}
            for token, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
                if idx < rows[i] and token not in have:
                    out_tok.add_tokens([token], special_tokens=token in added)
                    have.add(token)
    else:
        out_tok = tokenizers[int(source)]
    vocab = out_tok.get_vocab()
    size = len(vocab)
    sources = []
    for i, tok in enumerate(tokenizers):
        model_vocab = tok.get_vocab()
        src = torch.full((size,), -1, dtype=torch.long)
        for token, new_id in vocab.items():
            old = model_vocab.get(token)
            if old is not None and old < rows[i] and new_id < size:
                src[new_id] = old
        sources.append(src)
    present = torch.stack([s >= 0 for s in sources])
    counts = present.sum(dim=0)
    fill_from = torch.full((size,), -1, dtype=torch.long)
    only = counts == 1
    fill_from[only] = present[:, only].to(torch.long).argmax(dim=0)
    if base is not None:
        from_base = (counts > 1) & present[base]
        fill_from[from_base] = base
    fill_from[counts == 0] = -2
    return VocabAlignment(out_tok, size, sources, fill_from)
