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

import torch

from .base import PER_NON_BASE, UNIT, Domain, MergeMethod, MethodSpec, Param, TensorInputs, sum_of, task_vectors

FINITE_SCALE = Domain()


def svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of `a`; where LAPACK's divide-and-conquer does not converge (a matrix with many repeated,
    near-zero singular values: a task vector with the common subspace projected out), the same SVD computed
    in float64 and rounded back."""
    try:
        return torch.linalg.svd(a, full_matrices=False)
    except RuntimeError:  # torch.linalg.LinAlgError
        if a.dtype == torch.float64:
            raise
    u, s, vh = torch.linalg.svd(a.to(torch.float64), full_matrices=False)
    return u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype)


def _polar(a: torch.Tensor) -> torch.Tensor:
    """The orthonormal matrix nearest to `a` (its polar factor U V^T)."""
    u, _, vh = svd(a)
    return u @ vh


def _mean(tvs: list[torch.Tensor]) -> torch.Tensor:
    return sum_of(tvs).div_(len(tvs))


def _matrix(x: TensorInputs, p: dict) -> bool:
    return x.tensors[x.base].dim() == 2 and p["svd"]


def tsv_m(x: TensorInputs, p: dict) -> torch.Tensor:
    base = x.tensors[x.base]
    if not x.non_base:
        return base.clone()
    tvs = task_vectors(x, weighted=True)
    if not _matrix(x, p):
        merged = _mean(tvs)
    else:
        m, n = base.shape
        k = min(m, n)
        r = int(k * (1 / len(tvs)))  # FusionBench's rank per task (0 when there are more tasks than k)
        us, ss, vhs = [], [], []
        for tv in tvs:
            u, s, vh = svd(tv)
            us.append(u[:, :r])
            ss.append(s[:r])
            vhs.append(vh[:r])
        del tvs
        if r == 0:
            merged = torch.zeros_like(base)
        else:
            u, s, vh = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)
            merged = _polar(u) @ torch.diag(s) @ _polar(vh)
    return base + merged.mul_(p["scaling"])


def iso_c(x: TensorInputs, p: dict) -> torch.Tensor:
    base = x.tensors[x.base]
    if not x.non_base:
        return base.clone()
    tvs = task_vectors(x)
    if not _matrix(x, p):
        merged = _mean(tvs)
    else:
        u, s, vh = svd(sum_of(tvs))
        merged = (u * s.mean()) @ vh
    return base + merged.mul_(p["scaling"])


def iso_cts_sizes(k: int, tasks: int, fraction: float) -> tuple[int, int]:
    """(common rank, rank per task) of Iso-CTS for a rank-k matrix and `tasks` task vectors (FusionBench's
    rounding, so that common + tasks * per_task == k)."""
    common = int(k * fraction)
    common = k - round((k - common) / tasks) * tasks
    return common, int((k - common) / tasks)


def iso_cts(x: TensorInputs, p: dict) -> torch.Tensor:
    base = x.tensors[x.base]
    if not x.non_base:
        return base.clone()
    tvs = task_vectors(x)
    if not _matrix(x, p):
        merged = _mean(tvs)
    else:
        k = min(base.shape)
        common, per_task = iso_cts_sizes(k, len(tvs), p["common_space_fraction"])
        if common < 0:
            raise ValueError(f"iso_cts: common_space_fraction {p['common_space_fraction']:g} leaves no common "
                             f"subspace for a rank-{k} matrix and {len(tvs)} task vectors; raise it")
        u, s, vh = svd(sum_of(tvs))
        uc, sc, vc = u[:, :common], s[:common], vh[:common]
        del u, s, vh
        us, ss, vhs = [], [], []
        for tv in tvs:
            outside = tv - uc @ (uc.T @ tv)  # the task's part outside the common (left) subspace
            ut, st, vt = svd(outside)
            us.append(ut[:, :per_task])
            ss.append(st[:per_task])
            vhs.append(vt[:per_task])
        del tvs
        u_all = torch.cat(us + [uc], dim=1)
        s_all = torch.cat(ss + [sc])
        vh_all = torch.cat(vhs + [vc], dim=0)
        merged = (_polar(u_all) * s_all.mean()) @ _polar(vh_all)
    return base + merged.mul_(p["scaling"])


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
