"""Align vocabulary-indexed rows (embeddings, lm_head) across models by token string.

Rows a model lacks are filled as mergekit 0.1.5 does: from the only model that
has the token, else from the base if it has it, else the mean over the models
that have it (zeros if none).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..errors import ConfigError, InputError


@dataclass
class VocabAlignment:
    tokenizer: object  # the output tokenizer (transformers), saved with the model
    size: int  # output rows: the vocabulary, padded up to a multiple of `pad_to_multiple_of`
    sources: list[torch.Tensor]  # per input model: source row of each output row, -1 if absent
    fill_from: torch.Tensor  # per output row: input index to copy a missing row from, -1: mean, -2: zero
    # `tokenizer: tokens:` overrides: output row -> (input index, its source row) or (-2, -1) for zeros
    override: dict[int, tuple[int, int]] = field(default_factory=dict)
    forced: set[int] = field(default_factory=set)  # rows every model takes from its override
    tokens: int = 0  # rows that are tokens (the rest, up to size, is padding: the mean of the token rows)

    def __post_init__(self):
        self.tokens = self.tokens or self.size

    def align(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Permute/fill rows of each model's tensor into the output vocabulary."""
        out_shape = (self.tokens, *tensors[0].shape[1:])
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        present = [src >= 0 for src in self.sources]
        fill = torch.zeros(out_shape, dtype=dtype)
        needs_fill = ~torch.stack(present).all(dim=0)
        rows = needs_fill.nonzero().flatten().tolist()
        for row in sorted(set(rows) | set(self.override)):
            if row in self.override:
                model, src_row = self.override[row]
                if model >= 0:
                    fill[row] = tensors[model][src_row]
                continue  # zeros
            donor = int(self.fill_from[row])
            if donor >= 0:
                fill[row] = tensors[donor][self.sources[donor][row]]
            elif donor == -1:
                have = [i for i in range(len(tensors)) if present[i][row]]
                fill[row] = sum(tensors[i][self.sources[i][row]].to(dtype) for i in have) / len(have)
        forced = torch.zeros(self.tokens, dtype=torch.bool)
        forced[list(self.forced)] = True
        result = []
        for t, src, has in zip(tensors, self.sources, present):
            aligned = fill.clone()
            keep = has & ~forced
            aligned[keep] = t[src[keep]].to(dtype)
            if self.size > self.tokens:  # padding rows: the mean of the token rows (mergekit's choice)
                aligned = torch.cat([aligned, aligned.mean(dim=0, keepdim=True).expand(
                    self.size - self.tokens, *aligned.shape[1:])])
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
    tokens: Optional[dict] = None,
    pad_to_multiple_of: Optional[int] = None,
    model_index=None,
) -> VocabAlignment:
    """`source` is "base", "union" or the index (as text) of the model whose tokenizer to use.

    `rows[i]` is the number of embedding rows model i has (tokens with larger ids are padding).
    `tokens` ({token: TokenSource}) and `pad_to_multiple_of` are the `tokenizer:` block's (mergekit 0.1.5's
    semantics); `model_index(ref)` gives an input's index from a model reference in them (None: not an input).
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
    override, forced = _token_overrides(tokens or {}, vocab, sources, tokenizers, rows, model_index)
    padded = size if not pad_to_multiple_of else -(-size // pad_to_multiple_of) * pad_to_multiple_of
    return VocabAlignment(out_tok, padded, sources, fill_from, override, forced, size)


def _token_overrides(tokens: dict, vocab: dict[str, int], sources: list[torch.Tensor], tokenizers: list,
                     rows: list[int], model_index) -> tuple[dict[int, tuple[int, int]], set[int]]:
    """Each configured token's output row -> (input, source row) or (-2, -1) for zeros; and the forced rows."""
    override, forced = {}, set()
    for token, spec in tokens.items():
        if token not in vocab:
            raise ConfigError(f"tokenizer.tokens: {token!r} is not a token of the output vocabulary; use a token "
                              "the output tokenizer has (check its spelling, e.g. the leading space marker)")
        row = vocab[token]
        src = spec.source
        if src is None:
            if spec.force:
                raise ConfigError(f"tokenizer.tokens.{token}: force without a source; give `source:`")
            continue
        if getattr(src, "kind", None) == "zero":
            override[row] = (-2, -1)
        else:
            ref = src if isinstance(src, str) else src.model
            i = model_index(ref) if model_index else None
            if i is None:
                raise ConfigError(f"tokenizer.tokens.{token}: source model {ref!r} is not one of the input models")
            if isinstance(src, str):
                src_row = int(sources[i][row])
                if src_row < 0:
                    raise ConfigError(f"tokenizer.tokens.{token}: model {ref} does not have the token {token!r}; "
                                      "use {kind: model_token, model: ..., token: ...} to name another of its tokens")
            elif src.token_id is not None:
                src_row = src.token_id
            else:
                src_row = tokenizers[i].get_vocab().get(src.token, -1)
                if src_row < 0:
                    raise ConfigError(f"tokenizer.tokens.{token}: model {ref} has no token {src.token!r}")
            if not 0 <= src_row < rows[i]:
                raise ConfigError(f"tokenizer.tokens.{token}: token id {src_row} is outside model {ref}'s "
                                  f"{rows[i]} embedding rows")
            override[row] = (i, src_row)
        if spec.force:
            forced.add(row)
    return override, forced
