"""Training data: reading records, the k-shot selection, and tokenisation for pt (packed) and sft (masked)."""

from __future__ import annotations

import random
import string
from collections import defaultdict
from typing import Optional, Sequence

import torch

from ..errors import ConfigError
from ..io.chat_templates import NAMED_TEMPLATES
from ..io.records import DataError, read_table, read_text, require_columns
from ..runtime import note
from .config import DataConfig, TrainConfig

IGNORE = -100


def read_records(cfg: DataConfig) -> list[dict]:
    path = cfg.path
    if not path.is_file():
        raise DataError(f"training data {path} does not exist")
    fmt = cfg.format
    if fmt == "auto":
        fmt = {".txt": "text", ".text": "text", ".md": "text"}.get(path.suffix.lower(), "table")
    if fmt == "text":
        rows = [{cfg.text: line} for line in read_text(path).split("\n") if line.strip()]
        if not rows:
            raise DataError(f"training data {path} holds no text (one document per non-empty line)")
        return rows
    return read_table(path)


def check_columns(rows: list[dict], cfg: TrainConfig) -> None:
    d = cfg.data
    if cfg.stage == "pt":
        needed = [d.text]
    elif d.messages:
        needed = [d.messages]
    elif d.prompt_template:
        needed = [d.response]
    else:
        needed = [d.prompt, d.response]
    if d.label:
        needed.append(d.label)
    require_columns(rows, needed, d.path)
    if d.prompt_template:
        fields = template_fields(d.prompt_template)
        for i, row in enumerate(rows):
            missing = [f for f in fields if f not in row]
            if missing:
                raise DataError(f"{d.path}, record {i + 1}: data.prompt_template names column(s) "
                                f"{', '.join(map(repr, missing))} which it does not have (columns found: "
                                f"{', '.join(sorted(map(str, row)))})")
            try:
                d.prompt_template.format(**row)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
                raise DataError(f"{d.path}, record {i + 1}: data.prompt_template {d.prompt_template!r} cannot be "
                                f"filled in ({type(e).__name__}: {e}); keep to plain {{column}} fields") from None


TEMPLATE_HELP = ("name columns in braces, e.g. 'Findings: {findings}\\nImpression:', and write a literal brace "
                 "as {{ or }}")


def template_fields(template: str) -> list[str]:
    """The column names a prompt_template fills in; a template str.format cannot use is a ConfigError naming it."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"data.prompt_template {template!r} is not a valid template ({e}); {TEMPLATE_HELP}") from None
    fields = []
    for _, name, spec, _ in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise ConfigError(f"data.prompt_template {template!r} has a positional field {{{name}}}; fields are "
                              f"column names: {TEMPLATE_HELP}")
        if any(c in name for c in ".[]"):
            raise ConfigError(f"data.prompt_template {template!r}: field {{{name}}} is not a plain column name "
                              f"(attribute and index access are not supported); {TEMPLATE_HELP}")
        if spec and "{" in spec:
            raise ConfigError(f"data.prompt_template {template!r}: field {{{name}:{spec}}} nests a field in its "
                              f"format spec; {TEMPLATE_HELP}")
        fields.append(name)
    return list(dict.fromkeys(fields))


def k_shot_order(rows: Sequence[dict], seed: int, label: Optional[str] = None) -> list[int]:
    """A seeded order of all row indices whose every prefix is a k-shot selection.

    Prefixes nest by construction (the 64 are the first 64 of the 256). With a
    label column the order interleaves the labels in proportion to their
    frequency, so every prefix is stratified: item i of a group of size n sits
    at position (i + u) / n with u drawn per group from the seed.
    """
    rng = random.Random(seed)
    if label is None:
        order = list(range(len(rows)))
        rng.shuffle(order)
        return order
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[str(row[label])].append(i)
    keyed = []
    for name in sorted(groups):
        members = groups[name]
        rng.shuffle(members)
        offset = rng.random()
        keyed += [((rank + offset) / len(members), rng.random(), idx) for rank, idx in enumerate(members)]
    return [idx for _, _, idx in sorted(keyed)]


def select_k(rows: list[dict], cfg: TrainConfig) -> tuple[list[dict], Optional[list[int]]]:
    if cfg.k_shot is None:
        return rows, None
    if cfg.k_shot > len(rows):
        raise DataError(f"k_shot={cfg.k_shot} but {cfg.data.path} has only {len(rows)} records; "
                        "lower k_shot or give more data")
    chosen = sorted(k_shot_order(rows, cfg.seed, cfg.data.label)[: cfg.k_shot])
    return [rows[i] for i in chosen], chosen


# --- tokenisation -----------------------------------------------------------------------------------


def pack_documents(tokenizer, texts: Sequence[str], block: int) -> list[dict]:
    """Concatenate documents with EOS between them and cut into `block`-token examples (the tail is dropped)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token; packing needs one to separate documents")
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
    n = len(stream) // block
    if n == 0:
        raise DataError(f"the data holds {len(stream)} tokens, fewer than one block of max_seq_length={block}; "
                        "lower max_seq_length or give more text")
    return [{"input_ids": stream[i * block:(i + 1) * block], "labels": stream[i * block:(i + 1) * block]}
            for i in range(n)]


def documents(tokenizer, texts: Sequence[str], block: int) -> list[dict]:
    """Unpacked pt: one example per document (+ EOS), truncated to `block`."""
    out = []
    for text in texts:
        ids = (tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:block]
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def conversations(rows: Sequence[dict], cfg: TrainConfig) -> list[list[dict]]:
    d = cfg.data
    out = []
    for i, row in enumerate(rows):
        if d.messages:
            msgs = row[d.messages]
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
                raise DataError(f"{d.path}, record {i + 1}: {d.messages!r} must be a list of {{role, content}} messages")
            if not any(m["role"] == "assistant" for m in msgs):
                raise DataError(f"{d.path}, record {i + 1}: no assistant message to learn from")
        else:
            prompt = d.prompt_template.format(**row) if d.prompt_template else str(row[d.prompt])
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row[d.response])}]
        if d.system:
            msgs = [{"role": "system", "content": d.system}, *msgs]
        out.append(msgs)
    return out


def template_for(tokenizer, cfg: TrainConfig) -> str:
    if cfg.chat_template:
        return NAMED_TEMPLATES[cfg.chat_template]
    return tokenizer.chat_template or NAMED_TEMPLATES["plain"]


def render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


# truncation "prompt": of a context segment that is cut, its first and last tokens stay (the chat header and the
# instruction's start; the end of the user's text and the assistant header that the answer follows); blocks under
# 256 tokens keep an eighth of the block at each end
KEEP_HEAD, KEEP_TAIL = 32, 32


def cut_prompts(segments: list[tuple[list[int], bool]], limit: int) -> list[tuple[list[int], bool]]:
    """Remove tokens from the middle of the context segments (longest first) until the example fits `limit`;
    answers (trained segments) are never cut here, so a long dialogue keeps its whole note and end-of-turn token."""
    excess = sum(len(ids) for ids, _ in segments) - limit
    head, tail = min(KEEP_HEAD, limit // 8), min(KEEP_TAIL, limit // 8)  # short blocks keep less of each end
    out = list(segments)
    for i in sorted((i for i, (_, trained) in enumerate(out) if not trained), key=lambda i: -len(out[i][0])):
        if excess <= 0:
            break
        ids = out[i][0]
        cut = min(excess, max(0, len(ids) - head - tail))
        if cut:
            out[i] = (ids[:head] + ids[head + cut:], False)
            excess -= cut
    return out


def sft_example(tokenizer, template: str, messages: list[dict], block: int, truncation: str = "end") -> dict:
    """Token ids with labels only on assistant turns: each turn is the difference of two renderings.

    Special tokens come only from the template (tokenised with add_special_tokens=False),
    so a template that starts with {{ bos_token }} gets exactly one BOS. Longer than `block`:
    cut at the end ("end"), or first in the middle of the prompts ("prompt", see `cut_prompts`)
    and then at the end if the answers alone are too long.
    """
    segments: list[tuple[list[int], bool]] = []
    done_text = ""
    for j, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = render(tokenizer, template, messages[:j], add_generation_prompt=True)
        after = render(tokenizer, template, messages[: j + 1], add_generation_prompt=False)
        if not before.startswith(done_text) or not after.startswith(before):
            raise DataError("the chat template does not render conversations as growing prefixes; "
                            "choose another chat_template (chatml, llama3, plain)")
        segments.append((tokenizer(before[len(done_text):], add_special_tokens=False)["input_ids"], False))
        segments.append((tokenizer(after[len(before):], add_special_tokens=False)["input_ids"], True))
        done_text = after
    cut = truncation == "prompt" and sum(len(ids) for ids, _ in segments) > block - 1
    if cut:
        segments = cut_prompts(segments, block - 1)  # block - 1: the caller's max_seq_length (it passes one more)
    ids = [t for seg, _ in segments for t in seg]
    labels = [t if trained else IGNORE for seg, trained in segments for t in seg]
    return {"input_ids": ids[:block], "labels": labels[:block], "prompt_cut": cut}


def build_examples(tokenizer, rows: list[dict], cfg: TrainConfig) -> tuple[list[dict], dict]:
    """Examples for the Trainer plus statistics (tokens, trained tokens, truncated examples)."""
    block = cfg.max_seq_length
    if cfg.stage == "pt":
        texts = [str(r[cfg.data.text]) for r in rows]
        examples = pack_documents(tokenizer, texts, block) if cfg.packing else documents(tokenizer, texts, block)
        truncated = 0
    else:
        template = template_for(tokenizer, cfg)
        examples, truncated, untrained = [], 0, []
        for i, msgs in enumerate(conversations(rows, cfg)):
            ex = sft_example(tokenizer, template, msgs, block + 1, cfg.truncation)
            prompt_cut = ex.pop("prompt_cut")
            if prompt_cut or len(ex["input_ids"]) > block:
                truncated += 1
                ex = {"input_ids": ex["input_ids"][:block], "labels": ex["labels"][:block]}
            if all(t == IGNORE for t in ex["labels"]):
                # the prompt alone fills max_seq_length: a step on it trains nothing and logs loss 0
                untrained.append(i + 1)
                continue
            examples.append(ex)
        if untrained:
            shown = ", ".join(map(str, untrained[:5])) + (", ..." if len(untrained) > 5 else "")
            if not examples:
                raise DataError(f"{cfg.data.path}: no example has a response token left within max_seq_length={block} "
                                f"(in all {len(untrained)}, the prompt alone fills it); raise max_seq_length or "
                                "shorten the prompts")
            which = f"number(s) {shown} of the k_shot={cfg.k_shot} subset" if cfg.k_shot else f"record(s) {shown}"
            note(f"{cfg.data.path}: left out {len(untrained)} of {len(rows)} example(s) ({which}) whose prompt alone "
                 f"fills max_seq_length={block}, so no response token would be trained; raise max_seq_length to "
                 "keep them (the count is recorded as data.no_trained_token)")
    trained = sum(sum(1 for t in ex["labels"] if t != IGNORE) for ex in examples)
    if trained == 0:
        raise DataError(f"{cfg.data.path}: no token to train on after masking and truncation "
                        f"(max_seq_length={block}); raise max_seq_length")
    stats = {"examples": len(examples), "tokens": sum(len(ex["input_ids"]) for ex in examples),
             "trained_tokens": trained, "truncated": truncated}
    if cfg.stage == "sft" and untrained:
        stats["no_trained_token"] = len(untrained)  # examples left out (only when some were: records stay comparable)
    return examples, stats


class PadCollator:
    """Right-pads a batch; padding is masked out of attention and loss."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict:
        n = max(len(ex["input_ids"]) for ex in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, ex in enumerate(batch):
            k = len(ex["input_ids"])
            ids[i, :k] = torch.tensor(ex["input_ids"])
            labels[i, :k] = torch.tensor(ex["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
