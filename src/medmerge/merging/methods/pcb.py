"""PCB-merging (Parameter Competition Balancing, Du et al., NeurIPS 2024), exact and streamed.

PCB weighs each entry of each task vector by its competition within the task (intra-balancing: its magnitude
among the task's, after clipping the extreme quantiles) and across tasks (inter-balancing: agreement with the
sum of the task vectors), keeps each task's top `ratio` of entries by that balance, and averages the clipped
task vectors with the kept balances as weights.

Its normalisations and quantiles are over the whole model (the authors flatten every tensor of a task into
one vector), so a per-tensor kernel alone would compute another method. medmerge computes those whole-model
statistics exactly in a pre-pass that streams the tensors four times (`prepare`): two passes select the
clipping quantiles of |tau_i| (a histogram of the top 20 bits of the values' order-preserving keys, then an
exact selection inside the bucket), two more the balance threshold and maximum. Given those numbers each
entry is merged on its own, so the passes and the merge stream row chunks, and memory stays at a few chunks
(plus the bucket counts) whatever the model's size.

Definitions as the authors' code (duguodong7/pcb-merging, commit 5897888b, `PCB_merge` and the NLP
`task_para_att_merge`): clip quantiles at index int(d c) and int(d (1 - c) - 1) of the sorted |tau_i|;
intra = exp(n mm(A_i)^2); inter = tanh(tau_i * sum_j tau_j); the threshold is the entry at index
int(d (1 - ratio)) of the sorted balance; W = B + lam sum_i w_i C_i s_i / max(sum_i s_i, 1e-12).
Checked against outputs recorded from that code (tests/data/fusionbench).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from .base import CHUNK, PER_NON_BASE, Domain, MergeMethod, MethodSpec, Param, TensorInputs, sum_of, task_vectors

BUCKET_BITS = 20  # histogram resolution of the exact selection: 2^20 buckets (8 MB of counts per task)


def _keys(x: torch.Tensor) -> torch.Tensor:
    """Integers ordered like the float values of `x` (IEEE bit patterns, negatives' magnitude bits flipped)."""
    if x.dtype == torch.float64:
        i, top = x.view(torch.int64), (1 << 63) - 1
    else:
        i, top = x.to(torch.float32).view(torch.int32), (1 << 31) - 1
    return torch.where(i < 0, i ^ top, i)


def _bucket(x: torch.Tensor) -> torch.Tensor:
    bits = 64 if x.dtype == torch.float64 else 32
    return (_keys(x) >> (bits - BUCKET_BITS)).to(torch.int64) + (1 << (BUCKET_BITS - 1))


class ExactSelection:
    """The k-th smallest values (0-based `ks`) of a sequence of tensors seen in two passes: `count` every tensor,
    then `collect` every tensor again in any order; `values()` gives them exactly, as `torch.sort` would.

    Memory: the 2^20 bucket counts, chunk-sized temporaries, and the distinct values (with their counts) of the
    target buckets. A float32 bucket spans at most 2^12 distinct values, however many entries fall into it
    (a bucket of zeros, where bfloat16 fine-tunes left entries unchanged, is one value and one count).
    """

    def __init__(self):
        self.hist = None
        self.targets: list[tuple[int, int]] = []  # per k: (bucket, rank inside it)
        self.found: list[tuple[torch.Tensor, torch.Tensor]] = []  # per k: (distinct values, their counts)

    def count(self, x: torch.Tensor) -> None:
        for chunk in x.reshape(-1).split(CHUNK):
            h = torch.bincount(_bucket(chunk), minlength=1 << BUCKET_BITS)
            self.hist = h if self.hist is None else self.hist.add_(h)

    @property
    def total(self) -> int:
        return 0 if self.hist is None else int(self.hist.sum())

    def target(self, ks: list[int]) -> None:
        cum = torch.cumsum(self.hist, 0)
        self.targets = []
        for k in ks:
            if not 0 <= k < self.total:
                raise ValueError(f"selection index {k} outside 0..{self.total - 1}")
            b = int(torch.searchsorted(cum, torch.tensor(k, dtype=cum.dtype), right=True))
            self.targets.append((b, k - (int(cum[b - 1]) if b else 0)))
        self.found = [(torch.empty(0), torch.empty(0, dtype=torch.int64)) for _ in ks]

    def collect(self, x: torch.Tensor) -> None:
        for chunk in x.reshape(-1).split(CHUNK):
            buckets = _bucket(chunk)
            for j, (b, _) in enumerate(self.targets):
                values, counts = torch.unique(chunk[buckets == b], return_counts=True)
                if values.numel():
                    self.found[j] = _merge_counts(self.found[j], (values, counts))

    def values(self) -> list[float]:
        out = []
        for (_, rank), (values, counts) in zip(self.targets, self.found):
            position = int(torch.searchsorted(torch.cumsum(counts, 0), torch.tensor(rank), right=True))
            out.append(float(values[position]))
        return out


def _merge_counts(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]):
    """Two (sorted distinct values, counts) sets as one."""
    values, inverse = torch.unique(torch.cat([a[0].to(b[0].dtype), b[0]]), return_inverse=True)
    counts = torch.zeros(values.numel(), dtype=torch.int64).index_add_(0, inverse, torch.cat([a[1], b[1]]))
    return values, counts


def _balance(tv: torch.Tensor, total: torch.Tensor, lo: float, hi: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(intra * inter, the clipped magnitudes A) of one task vector: the same operations in the pre-pass and the
    kernel, on the same whole tensor, so the threshold is compared with bit-identical values."""
    a = tv.abs().clamp_(lo, hi)
    intra = ((a - lo) / (hi - lo)).square_().mul_(n).exp_()
    return intra.mul_(torch.tanh(tv * total)), a


def prepare(each: Callable[[], Iterator[TensorInputs]], params: dict) -> dict:
    """The whole-model statistics of every task vector: clip bounds, balance threshold and maximum."""
    c, ratio = params["clamp_ratio"], params["ratio"]
    abs_sel, tasks = None, 0
    for x in each():
        tvs = task_vectors(x)
        if abs_sel is None:
            tasks = len(tvs)
            abs_sel = [ExactSelection() for _ in tvs]
        for sel, tv in zip(abs_sel, tvs):
            sel.count(tv.abs())
    if not tasks:
        return {"tasks": 0}
    d = abs_sel[0].total
    for sel in abs_sel:
        sel.target([int(d * c), int(d * (1 - c) - 1)])
    for x in each():
        for sel, tv in zip(abs_sel, task_vectors(x)):
            sel.collect(tv.abs())
    bounds = [sel.values() for sel in abs_sel]
    del abs_sel
    for i, (lo, hi) in enumerate(bounds):
        if not hi > lo:
            raise ValueError(f"pcb: the clipped magnitudes of task vector {i + 1} are all {lo:g} (a model equal to the "
                             "base, or clamp_ratio too large); leave that model out or lower clamp_ratio")
    bal_sel = [ExactSelection() for _ in range(tasks)]
    top = [float("-inf")] * tasks

    def balances(x):
        tvs = task_vectors(x)
        total = sum_of(tvs)
        return [_balance(tv, total, lo, hi, tasks)[0] for tv, (lo, hi) in zip(tvs, bounds)]

    for x in each():
        for i, bal in enumerate(balances(x)):
            bal_sel[i].count(bal)
            top[i] = max(top[i], float(bal.max()))
    for sel in bal_sel:
        sel.target([int(d * (1 - ratio))])
    for x in each():
        for sel, bal in zip(bal_sel, balances(x)):
            sel.collect(bal)
    thresholds = [sel.values()[0] for sel in bal_sel]
    for i, (thr, mx) in enumerate(zip(thresholds, top)):
        if not mx > thr:
            raise ValueError(f"pcb: ratio {ratio:g} keeps no entry of task vector {i + 1} (its threshold equals its "
                             "largest balance); raise ratio")
    return {"tasks": tasks, "entries": d, "bounds": bounds, "thresholds": thresholds, "max": top}


def pcb(x: TensorInputs, p: dict) -> torch.Tensor:
    base = x.tensors[x.base]
    if not x.non_base:
        return base.clone()
    g = x.globals
    tvs = task_vectors(x)
    total = sum_of(tvs)
    num, den = torch.zeros_like(base), torch.zeros_like(base)
    for i, tv, (lo, hi), thr, mx in zip(x.non_base, tvs, g["bounds"], g["thresholds"], g["max"]):
        bal, a = _balance(tv, total, lo, hi, len(tvs))
        scale = bal.clamp_(min=thr).sub_(thr).div_(mx - thr)
        clipped = a.mul_(tv.sign()).mul_(float(x.model_params[i]["weight"]))
        num.add_(clipped.mul_(scale))
        den.add_(scale)
    return base + num.div_(den.clamp_(min=1e-12)).mul_(p["lam"])


PCB = MergeMethod(
    MethodSpec(
        name="pcb",
        params=(
            Param("weight", float, PER_NON_BASE, default=1.0, doc="lambda_i: each clipped task vector is scaled by "
                  "it inside the weighted average (the authors' per-task lams)"),
            Param("ratio", float, default=0.1, domain=Domain(0.0, 1.0, low_open=True),
                  doc="share of each task vector's entries kept by balance (whole model)"),
            Param("clamp_ratio", float, default=0.0001, domain=Domain(0.0, 0.5, high_open=True),
                  doc="share clipped at each end of the sorted magnitudes (key steps: 0.0001, NLP code: 0.01)"),
            Param("lam", float, default=1.0, doc="the merged task vector is scaled by it before it is added"),
        ),
        base="required",
        min_non_base=1,
        prepare=prepare,
        elementwise=lambda g, m: True,  # given the whole-model statistics, each entry is merged on its own
        formula="tau_i = W_i - B (whole model: d entries); A_i = clip(|tau_i|, q_c, q_(1-c)); C_i = sign(tau_i) A_i; "
                "beta_i = exp(n mm(A_i)^2) tanh(tau_i * sum_j tau_j); s_i = mm(max(beta_i, beta_i[int(d (1 - ratio))]))"
                "; W = B + lam sum_i w_i C_i s_i / max(sum_i s_i, 1e-12), mm = min-max scaling over the whole model",
        reference="https://arxiv.org/abs/2410.02396",
        memory="streamed by rows, also in the four passes of its whole-model statistics",
    ),
    pcb,
)
