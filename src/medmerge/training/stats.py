"""`medmerge stats`: one pass of a calibration set through a model, keeping what data-aware merges need.

- `gram` (RegMean, Jin et al., ICLR 2023): for every linear layer whose weight is a tensor of the checkpoint,
  G = X^T X / n over the n non-padding calibration tokens, X the layer's inputs. Layers that read the same input
  (q/k/v, gate/up) share one accumulator while collecting (memory) and are stored under each weight's name.
- `fisher` (Fisher merging, Matena and Raffel, NeurIPS 2022): the diagonal empirical Fisher of every parameter
  stored in the checkpoint, the mean over examples of (d/dtheta of the example's mean token log-likelihood)^2,
  one example at a time (per-example gradients: squaring a batch's gradient would be another quantity).

Calibration records (JSONL, JSON, CSV or TSV; or a .txt file of one document per line), each either a
document (`text`) or an instruction (`messages`, or `prompt` and `response`), rendered with the model's chat
template; a file may mix both. Gram statistics count every non-padding token of every example; Fisher
gradients come from the trained tokens (a document's every token, an instruction's response).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import ConfigError
from ..io.checkpoint import Checkpoint
from ..io.fingerprint import fingerprint, sha256_file
from ..io.records import DataError, read_table, read_text
from ..io.stats import FORMAT, KINDS, STATS_RECORD, stats_key
from ..io.writer import OutTensor, ShardedWriter, atomic_output_dir, check_output, output_path, shard_size
from ..runtime import note, progress, resolve_device
from .data import IGNORE, PadCollator, documents, sft_example, template_for


def read_calibration(path: Path) -> list[dict]:
    """Records of a calibration file; each must be a document or an instruction (named by line)."""
    if not path.is_file():
        raise DataError(f"calibration data {path} does not exist; pass a JSONL/CSV/TSV/JSON file of records with "
                        "`text`, or `prompt` and `response`, or `messages` (or a .txt file of one document per line)")
    if path.suffix.lower() in (".txt", ".text", ".md"):
        rows = [{"text": line} for line in read_text(path).split("\n") if line.strip()]
    else:
        rows = read_table(path)
    if not rows:
        raise DataError(f"calibration data {path} holds no records")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not ("text" in row or "messages" in row or ("prompt" in row and
                                                                                     "response" in row)):
            found = ", ".join(sorted(map(str, row))) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{path}, record {i + 1}: a calibration record needs `text` (a document), `messages` "
                            f"(a chat), or `prompt` and `response`; found {found}")
    return rows


def data_spec(spec: str | Path) -> tuple[Path, Optional[int]]:
    """'FILE' or 'FILE:N' (a seeded sample of N records of FILE) -> (FILE, N or None)."""
    text = str(spec)
    head, sep, tail = text.rpartition(":")
    if sep and tail.isdigit() and head:
        if int(tail) < 1:
            raise ConfigError(f"--data {text}: the sample size after ':' must be at least 1")
        return Path(head), int(tail)
    return Path(text), None


def read_mix(specs: Sequence[str | Path], seed: int) -> tuple[list[dict], list[dict]]:
    """The records of every FILE[:N] in order (each sample seeded by `seed` and the file's position) and, per
    file, what was taken: {path, sha256, records, taken}."""
    rows, parts = [], []
    for i, spec in enumerate(specs):
        path, n = data_spec(spec)
        found = read_calibration(path)
        order = list(range(len(found)))
        if n is not None and n < len(found):
            order = sorted(random.Random(f"{seed}:{i}").sample(order, n))
        rows += [found[j] for j in order]
        parts.append({"path": str(path.resolve()), "sha256": sha256_file(path), "records": len(found),
                      "taken": len(order)})
    return rows, parts


def calibration_examples(tokenizer, rows: Sequence[dict], max_length: int, path: Path) -> list[dict]:
    """Token ids and labels of each record: a document is trained on every token, a chat on its responses."""
    template = None
    out = []
    for i, row in enumerate(rows):
        if "text" in row and "messages" not in row and "prompt" not in row:
            out += documents(tokenizer, [str(row["text"])], max_length)
            continue
        if template is None:
            template = template_for(tokenizer, _NoTemplate())
        msgs = row.get("messages") or [{"role": "user", "content": str(row["prompt"])},
                                       {"role": "assistant", "content": str(row["response"])}]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise DataError(f"{path}, record {i + 1}: `messages` must be a list of {{role, content}} messages")
        ex = sft_example(tokenizer, template, msgs, max_length, truncation="prompt")
        ex.pop("prompt_cut")
        out.append(ex)
    return out


class _NoTemplate:
    """template_for's config: no chat_template override (the model's own, else the plain one)."""

    chat_template = None


class _GramCollector:
    """Forward pre-hooks that add X^T X of each linear layer's (non-padding) inputs into float32 accumulators.

    Linear layers of one parent module that read the same tensor share one accumulator: found on the first
    batch by identity of the input (only the current parent's input is held, so an id is never reused).
    """

    def __init__(self, model, weight_names: set[str]):
        self.modules = {n: m for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and f"{n}.weight" in weight_names}
        self.leader: dict[str, str] = {}  # module -> the module whose accumulator it shares
        self.grams: dict[str, torch.Tensor] = {}
        self.mask: Optional[torch.Tensor] = None
        self.tokens = 0
        self._first = True
        self._parent_inputs: dict[str, tuple[torch.Tensor, str]] = {}
        self._parent = None
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]

    def _hook(self, name: str):
        parent = name.rsplit(".", 1)[0] if "." in name else ""

        def hook(module, args):
            x = args[0]
            if self._first:
                if parent != self._parent:
                    self._parent_inputs, self._parent = {}, parent
                held = self._parent_inputs.get("x")
                if held is not None and held[0] is x:
                    self.leader[name] = held[1]
                    return
                self.leader[name] = name
                self._parent_inputs["x"] = (x, name)
            elif self.leader[name] != name:
                return
            with torch.no_grad():
                flat = x.detach().reshape(-1, x.shape[-1])
                if self.mask is not None and self.mask.numel() == flat.shape[0]:
                    flat = flat[self.mask.reshape(-1)]
                flat = flat.float()
                acc = self.grams.get(name)
                if acc is None:
                    acc = self.grams[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32,
                                                         device=x.device)
                acc.addmm_(flat.T, flat)

        return hook

    def batch_done(self) -> None:
        self._first = False
        self._parent_inputs, self._parent = {}, None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def collect_stats(model: str | Path, data: str | Path | Sequence[str | Path], out: str | Path, *,
                  kinds: Sequence[str] = KINDS, max_length: int = 512, limit: Optional[int] = None,
                  batch_size: int = 8, seed: int = 0, device: str = "cpu", dtype: str = "float32",
                  force: bool = False, progress_bar: bool = True, size: str = "5GB") -> dict:
    """Stream the calibration set through `model` once and write the statistics to `out`; returns the record.

    `data`: one file or several, each 'FILE' or 'FILE:N' (a seeded sample of N of its records): a mix of
    instruction and clinical records, for example. `limit` then samples N of all records.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # deferred: seconds to import

    specs = [data] if isinstance(data, (str, Path)) else list(data)
    if not specs:
        raise ConfigError("--data: give at least one calibration file")
    model_path, out = Path(model), output_path(out)
    data_paths = [data_spec(s)[0] for s in specs]
    data_path = data_paths[0]
    kinds = list(dict.fromkeys(kinds))
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        raise ConfigError(f"--kinds: {', '.join(unknown) or 'none given'}; choose among {', '.join(KINDS)}")
    for name, value, low in (("--max-length", max_length, 2), ("--batch-size", batch_size, 1),
                             ("--limit", limit if limit is not None else 1, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be a whole number >= {low}, got {value!r}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    check_output(out, force, [model_path, *data_paths])
    checkpoint = Checkpoint(model_path)  # a clear error for a folder without weights, before loading
    names = set(checkpoint.records)
    rows, parts = read_mix(specs, seed)
    order = list(range(len(rows)))
    if limit is not None and limit < len(rows):
        order = sorted(random.Random(seed).sample(order, limit))
    rows = [rows[i] for i in order]

    dev = torch.device(resolve_device(device))
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    examples = calibration_examples(tokenizer, rows, max_length, data_path if len(specs) == 1 else
                                    Path(", ".join(map(str, data_paths))))
    lm = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=getattr(torch, dtype)).to(dev)
    lm.eval()  # dropout off: the statistics are of the model as it is
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    collate = PadCollator(pad)
    params = {n: p for n, p in lm.named_parameters() if n in names and p.dtype.is_floating_point}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()} if "fisher" in kinds else None
    for p in lm.parameters():
        p.requires_grad_(fisher is not None and any(p is q for q in params.values()))
    grams = _GramCollector(lm, names) if "gram" in kinds else None
    step = 1 if fisher is not None else batch_size  # per-example gradients
    batches = [examples[i:i + step] for i in range(0, len(examples), step)]
    tokens = trained = used = 0
    with progress(progress_bar) as bar:
        task = bar.add_task(f"statistics ({', '.join(kinds)}) of {len(examples)} examples", total=len(examples))
        for batch in batches:
            b = collate(batch)
            mask = b["attention_mask"].to(dev).bool()
            if grams is not None:
                grams.mask = mask
            n_trained = int((b["labels"][:, 1:] != IGNORE).sum())
            with torch.set_grad_enabled(fisher is not None):
                result = lm(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev),
                            labels=b["labels"].to(dev) if fisher is not None else None)
            if grams is not None:
                grams.batch_done()
            if fisher is not None and n_trained:
                lm.zero_grad(set_to_none=True)
                result.loss.backward()
                for n, p in params.items():
                    if p.grad is not None:
                        fisher[n].add_(p.grad.float().square())
                used += 1
            tokens += int(mask.sum())
            trained += n_trained
            bar.advance(task, len(batch))
    if grams is not None:
        grams.remove()
    if fisher is not None and used == 0:
        raise DataError(f"{data_path}: no example has a token to compute a gradient on (every response is cut by "
                        f"--max-length {max_length}); raise --max-length")

    tensors: dict[str, torch.Tensor] = {}
    if grams is not None:
        for name in sorted(grams.modules):
            acc = grams.grams.get(grams.leader.get(name, name))
            if acc is not None:
                tensors[stats_key("gram", f"{name}.weight")] = acc / max(tokens, 1)
        missing = sorted(n for n in grams.modules if grams.leader.get(n) is None)
        if missing:
            note(f"{len(missing)} linear layer(s) never ran on the calibration data and have no gram statistics "
                 f"(e.g. {missing[0]}); a RegMean merge averages them")
    fisher_norm = None
    if fisher is not None:
        square_sum = 0.0
        for name in sorted(fisher):
            tensors[stats_key("fisher", name)] = value = fisher[name] / used
            square_sum += float(torch.linalg.vector_norm(value, dtype=torch.float64)) ** 2  # no float64 copy
        fisher_norm = square_sum ** 0.5  # over every parameter: Fisher merging's normalize_fisher_weight
    record = {
        "format": FORMAT,
        "kinds": kinds,
        "model": str(model_path.resolve()),
        "model_fingerprint": fingerprint(model_path),
        "data": str(data_path.resolve()) if len(parts) == 1 else [p["path"] for p in parts],
        "data_sha256": parts[0]["sha256"] if len(parts) == 1 else [p["sha256"] for p in parts],
        "data_parts": parts,
        "records": len(rows),
        "limit": limit,
        "seed": seed,
        "examples": len(examples),
        "tokens": tokens,
        "trained_tokens": trained,
        "fisher_examples": used if fisher is not None else None,
        "fisher_norm": fisher_norm,
        "max_length": max_length,
        "dtype": dtype,
        "device": str(dev),
        "shared_inputs": {n: lead for n, lead in sorted(grams.leader.items()) if n != lead} if grams else {},
        "definitions": {
            "gram": "X^T X / tokens over the non-padding calibration tokens, X the linear layer's inputs "
                    "(float32)",
            "fisher": "mean over examples of the squared gradient of the example's mean token negative "
                      "log-likelihood (trained tokens), float32",
        },
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    with atomic_output_dir(out, force=force, inputs=[model_path, *data_paths]) as tmp:
        writer = ShardedWriter(tmp, [OutTensor(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()],
                               shard_size(size), metadata={"medmerge": "stats"})
        for key, value in tensors.items():
            writer.begin(key)
            writer.write(value)
        writer.close()
        (tmp / STATS_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record
