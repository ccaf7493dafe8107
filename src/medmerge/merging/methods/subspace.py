"""Subspace merges of task vectors, one weight matrix at a time: TSV-M, Iso-C and Iso-CTS.

- TSV-M (Task Singular Vectors, Gargiulo et al., CVPR 2025): each task vector keeps its top 1/T singular
  components; the stacked left and right singular vectors are decorrelated (replaced by their nearest
  orthonormal matrices, the polar factors) and recombined with the kept singular values.
- Iso-C (Marczak et al., ICML 2025, "No task left behind"): the sum of the task vectors with its spectrum
  flattened: every singular value replaced by their mean.
- Iso-CTS (same paper): Iso-C's top common directions, plus for each task its top directions outside that
  common subspace, orthonormalised and given one isotropic singular value.

Definitions, defaults and edge cases follow FusionBench (tanganke/fusion_bench, commit 54c9e8c9): the same
rank formulas (`int(k * (1/T))`; Iso-CTS' rounding with Python's round), the mean of the task vectors for
1-D tensors and for tensors excluded from the SVD (`svd: false`, FusionBench's `exclude_keys`), and
`base + scaling * merged`. Each is checked against outputs recorded from FusionBench's code
(tests/data/fusionbench). They act per weight matrix, so a merge streams tensor by tensor; one tensor costs
its task vectors plus their thin SVD factors.
"""

from typing import Iterable

import torch

from .base import PER_NON_BASE, UNIT, Domain, MergeMethod, MethodSpec, Param, TensorInputs, sum_of, task_vectors

FINITE_SCALE = Domain()


def svd(a: torch.Tensor, wide: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of `a`; where LAPACK's divide-and-conquer does not converge (a matrix with many repeated
    singular values: Iso-CTS's stacked [P_1, P_2, U_c], whose polar factor has most singular values exactly 1;
    in float32 it failed with one MKL thread and converged with two), the same SVD computed in float64 and
    rounded back. `wide`: float64 from the start (Iso-CTS; costs 3.2 GB more and 1.9x the time on the 1B
    shape, see docs/benchmarks.md)."""
    if not wide or a.dtype == torch.float64:
        try:
            return torch.linalg.svd(a, full_matrices=False)
        except RuntimeError:  # torch.linalg.LinAlgError
            if a.dtype == torch.float64:
                raise
    u, s, vh = torch.linalg.svd(a.to(torch.float64), full_matrices=False)
    return u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype)


def _polar(a: torch.Tensor, wide: bool = False) -> torch.Tensor:
    """The orthonormal matrix nearest to `a` (its polar factor U V^T)."""
    u, _, vh = svd(a, wide)
    return u @ vh


def _mean(tvs: list[torch.Tensor]) -> torch.Tensor:
    return sum_of(tvs).div_(len(tvs))


def _subspace_merge(x: TensorInputs, p: dict, matrix, weighted: bool = False) -> torch.Tensor:
    """B + scaling * merged task vector: `matrix(tvs, p)` for a 2-D tensor with `svd` on, else the mean of the
    task vectors (FusionBench's rule for 1-D and excluded tensors)."""
    base = x.tensors[x.base]
    if not x.non_base:
        return base.clone()
    tvs = task_vectors(x, weighted=weighted)
    merged = matrix(tvs, p) if base.dim() == 2 and p["svd"] else _mean(tvs)
    return base + merged.mul_(p["scaling"])


def _top(matrices: Iterable[torch.Tensor], rank: int, wide: bool = False) -> tuple[list, list, list]:
    """The top `rank` singular triplets of each matrix: (U columns, singular values, V^T rows) lists."""
    us, ss, vhs = [], [], []
    for a in matrices:
        u, s, vh = svd(a, wide)
        us.append(u[:, :rank])
        ss.append(s[:rank])
        vhs.append(vh[:rank])
    return us, ss, vhs


def _tsv_m(tvs: list[torch.Tensor], p: dict) -> torch.Tensor:
    k = min(tvs[0].shape)
    r = int(k * (1 / len(tvs)))  # FusionBench's rank per task (0 when there are more tasks than k)
    if r == 0:
        return torch.zeros_like(tvs[0])
    us, ss, vhs = _top(tvs, r)
    tvs.clear()  # the task vectors are no longer needed: free them before the polar factors
    u, s, vh = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)
    return _polar(u) @ torch.diag(s) @ _polar(vh)


def _iso_c(tvs: list[torch.Tensor], p: dict) -> torch.Tensor:
    u, s, vh = svd(sum_of(tvs))
    tvs.clear()
    return (u * s.mean()) @ vh


def iso_cts_sizes(k: int, tasks: int, fraction: float) -> tuple[int, int]:
    """(common rank, rank per task) of Iso-CTS for a rank-k matrix and `tasks` task vectors (FusionBench's
    rounding, so that common + tasks * per_task == k)."""
    common = int(k * fraction)
    common = k - round((k - common) / tasks) * tasks
    return common, int((k - common) / tasks)


def _iso_cts(tvs: list[torch.Tensor], p: dict) -> torch.Tensor:
    k = min(tvs[0].shape)
    common, per_task = iso_cts_sizes(k, len(tvs), p["common_space_fraction"])
    if common < 0:
        raise ValueError(f"iso_cts: common_space_fraction {p['common_space_fraction']:g} leaves no common "
                         f"subspace for a rank-{k} matrix and {len(tvs)} task vectors; raise it")
    u, s, vh = svd(sum_of(tvs), wide=True)
    uc, sc, vc = u[:, :common], s[:common], vh[:common]
    del u, s, vh
    # each task's part outside the common (left) subspace, its top directions
    us, ss, vhs = _top((tv - uc @ (uc.T @ tv) for tv in tvs), per_task, wide=True)  # one at a time
    tvs.clear()
    u_all = torch.cat(us + [uc], dim=1)
    s_all = torch.cat(ss + [sc])
    vh_all = torch.cat(vhs + [vc], dim=0)
    return (_polar(u_all, wide=True) * s_all.mean()) @ _polar(vh_all, wide=True)


def tsv_m(x: TensorInputs, p: dict) -> torch.Tensor:
    return _subspace_merge(x, p, _tsv_m, weighted=True)


def iso_c(x: TensorInputs, p: dict) -> torch.Tensor:
    return _subspace_merge(x, p, _iso_c)


def iso_cts(x: TensorInputs, p: dict) -> torch.Tensor:
    return _subspace_merge(x, p, _iso_cts)


_SVD = Param("svd", bool, default=True, doc="false: average the task vectors of this tensor instead (FusionBench's "
             "exclude_keys; set per tensor with a filter, e.g. embed_tokens)")
_SCALING = Param("scaling", float, default=1.0, domain=FINITE_SCALE,
                 doc="alpha: the merged task vector is scaled by it before it is added to the base")
_MEMORY = "whole tensor: the task vectors of one matrix and their thin SVD factors"

TSV_M = MergeMethod(
    MethodSpec(
        name="tsv_m",
        params=(
            Param("weight", float, PER_NON_BASE, default=1.0, doc="each task vector is scaled by it before the SVD "
                  "(FusionBench's per-task alpha)"),
            _SCALING,
            _SVD,
        ),
        base="required",
        min_non_base=1,
        formula="tau_i = w_i (W_i - B) = U_i S_i V_i^T; r = int(k/T) (k = min(m, n)); U = [U_i[:, :r]], "
                "S = diag([S_i[:r]]), V = [V_i[:, :r]]; W = B + alpha polar(U) S polar(V)^T, polar(A) = P Q^T for "
                "A = P Sigma Q^T; 1-D tensors and svd: false: W = B + alpha mean_i tau_i",
        reference="https://arxiv.org/abs/2412.00081",
        memory=_MEMORY,
    ),
    tsv_m,
)

ISO_C = MergeMethod(
    MethodSpec(
        name="iso_c",
        params=(_SCALING, _SVD),
        base="required",
        min_non_base=1,
        formula="sum_i (W_i - B) = U S V^T; W = B + alpha mean(S) U V^T; 1-D tensors and svd: false: "
                "W = B + alpha mean_i (W_i - B)",
        reference="https://arxiv.org/abs/2502.04959",
        memory=_MEMORY,
    ),
    iso_c,
)

ISO_CTS = MergeMethod(
    MethodSpec(
        name="iso_cts",
        params=(
            Param("common_space_fraction", float, default=0.8, domain=UNIT,
                  doc="share of the rank k given to the common subspace (rounded so that the T task subspaces "
                      "share the rest equally)"),
            _SCALING,
            _SVD,
        ),
        base="required",
        min_non_base=1,
        formula="sum_i tau_i = U S V^T, common c = k - round((k - int(k f)) / T) T, per task p = (k - c) / T; "
                "tau_i - U_c U_c^T tau_i = P_i Sigma_i Q_i^T; U = [P_i[:, :p], U_c], V = [Q_i[:, :p], V_c], "
                "s = [Sigma_i[:p], S_c]; W = B + alpha mean(s) polar(U) polar(V)^T; 1-D: B + alpha mean_i tau_i",
        reference="https://arxiv.org/abs/2502.04959",
        memory=_MEMORY,
    ),
    iso_cts,
)
