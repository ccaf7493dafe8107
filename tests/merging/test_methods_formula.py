"""Every merge kernel against a hand computation of its formula on small tensors, plus
properties of whole merges (identity, symmetry, seeding, gradients and filters).

Kernels are called directly (`medmerge.merging.methods.get(name)` with `TensorInputs`) where the
formula is the point, and through `medmerge.merge_state_dicts` where parameter resolution
is. Hand values are written out (or computed with `math` in double precision) rather than
recomputed with the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

import medmerge
from medmerge.merging import methods
from medmerge.errors import MedmergeError
from medmerge.merging.methods.base import PER_NON_BASE, TensorInputs

F64 = torch.float64


def T(*values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def run(name, tensors, model_params, base=None, seed=None, tensor_name="model.layers.0.mlp.up_proj.weight", **params):
    """Call a kernel with the spec's defaults filled in, on copies of `tensors`."""
    method = methods.get(name)
    g = {p.name: p.default for p in method.spec.global_params}
    g.update(params)
    resolved = []
    for i, mp in enumerate(model_params):
        full = {p.name: p.default for p in method.spec.model_params
                if not (p.scope == PER_NON_BASE and i == base) and not p.required}
        full.update(mp)
        resolved.append(full)
    inputs = TensorInputs([t.clone() for t in tensors], base, resolved, name=tensor_name, seed=seed)
    return method(inputs, g)


def close(actual, expected, atol=1e-12):
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=0)


def slerp_closed_form(t, v0, v1):
    """sin((1-t)θ)/sinθ·v0 + sin(tθ)/sinθ·v1 over the flattened tensors, in Python floats."""
    a, b = v0.reshape(-1).tolist(), v1.reshape(-1).tolist()
    cos = sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
    theta = math.acos(cos)
    ca, cb = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return torch.tensor([ca * x + cb * y for x, y in zip(a, b)], dtype=F64).reshape(v0.shape)


# ---------------------------------------------------------------- linear

def test_linear_normalized_weighted_mean():
    a, b, c = T(1.0, 2.0, -3.0), T(4.0, 0.0, 1.0), T(-2.0, 6.0, 5.0)
    out = run("linear", [a, b, c], [{"weight": 1.0}, {"weight": 2.0}, {"weight": 1.0}])
    # (1*a + 2*b + 1*c) / 4
    close(out, T((1 + 8 - 2) / 4, (2 + 0 + 6) / 4, (-3 + 2 + 5) / 4))


def test_linear_unnormalized_weighted_sum():
    a, b = T(1.0, 2.0, -3.0), T(4.0, 0.0, 1.0)
    out = run("linear", [a, b], [{"weight": 0.5}, {"weight": 2.0}], normalize=False)
    close(out, T(0.5 + 8.0, 1.0, -1.5 + 2.0))


def test_linear_weights_summing_to_zero_cannot_be_normalized():
    with pytest.raises(ValueError, match="sum to 0"):
        run("linear", [T(1.0), T(2.0)], [{"weight": 1.0}, {"weight": -1.0}])
    close(run("linear", [T(1.0), T(2.0)], [{"weight": 1.0}, {"weight": -1.0}], normalize=False), T(-1.0))


# ---------------------------------------------------------------- slerp

def test_slerp_quarter_circle_by_hand():
    v0 = T(1.0, 0.0, 0.0, 0.0).reshape(2, 2)
    v1 = T(0.0, 1.0, 0.0, 0.0).reshape(2, 2)
    # θ = π/2, t = 1/2: both coefficients sin(π/4)/sin(π/2) = √2/2
    out = run("slerp", [v0, v1], [{}, {}], base=0, t=0.5)
    h = math.sqrt(0.5)
    close(out, T(h, h, 0.0, 0.0).reshape(2, 2))
    # t = 1/3: coefficients sin(π/3) and sin(π/6)
    out = run("slerp", [v0, v1], [{}, {}], base=0, t=1 / 3)
    close(out, T(math.sqrt(3) / 2, 0.5, 0.0, 0.0).reshape(2, 2))


@pytest.mark.parametrize("t", [0.0, 0.25, 0.7, 1.0])
def test_slerp_closed_form_whole_tensor(t):
    g = torch.Generator().manual_seed(1)
    v0, v1 = torch.randn(3, 4, generator=g, dtype=F64), torch.randn(3, 4, generator=g, dtype=F64)
    out = run("slerp", [v0, v1], [{}, {}], base=0, t=t)
    close(out, slerp_closed_form(t, v0, v1), atol=1e-12)
    # one vector for the whole tensor, not row by row
    rowwise = torch.stack([slerp_closed_form(t, v0[i], v1[i]) for i in range(3)])
    if 0 < t < 1:
        assert (out - rowwise).abs().max() > 1e-3


def test_slerp_endpoints_give_the_inputs_and_base_is_v0():
    g = torch.Generator().manual_seed(2)
    base, other = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    close(run("slerp", [base, other], [{}, {}], base=0, t=0.0), base, atol=1e-6)
    close(run("slerp", [base, other], [{}, {}], base=0, t=1.0), other, atol=1e-6)
    # base listed second: t = 0 still gives the base
    close(run("slerp", [other, base], [{}, {}], base=1, t=0.0), base, atol=1e-6)
    close(run("slerp", [other, base], [{}, {}], base=1, t=1.0), other, atol=1e-6)


@pytest.mark.parametrize("scale", [2.0, -3.0, 1.0])
def test_slerp_collinear_falls_back_to_lerp(scale):
    v0 = T(1.0, -2.0, 0.5, 3.0)
    v1 = scale * v0
    out = run("slerp", [v0, v1], [{}, {}], base=0, t=0.3)
    assert torch.isfinite(out).all()
    close(out, 0.7 * v0 + 0.3 * v1)


def test_slerp_nearly_collinear_uses_lerp_and_just_below_threshold_does_not():
    v0 = T(1.0, 0.0)
    near = T(1.0, 0.02)  # cos = 0.9998 > 0.9995: lerp
    close(run("slerp", [v0, near], [{}, {}], base=0, t=0.5), 0.5 * v0 + 0.5 * near)
    far = T(1.0, 0.05)  # cos = 0.99875 < 0.9995: the sphere
    out = run("slerp", [v0, far], [{}, {}], base=0, t=0.5)
    close(out, slerp_closed_form(0.5, v0, far))
    assert (out - (0.5 * v0 + 0.5 * far)).abs().max() > 1e-5


# ---------------------------------------------------------------- nuslerp

def test_nuslerp_without_base_is_slerp_with_t_from_weights():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64)
    out = run("nuslerp", [a, b], [{"weight": 1.0}, {"weight": 3.0}])
    close(out, slerp_closed_form(0.75, a, b))  # t = w2/(w1+w2)
    out = run("nuslerp", [a, b], [{"weight": 2.0}, {"weight": -2.0}])
    close(out, slerp_closed_form(0.5, a, b))  # weights sum to 0: t = 1/2


def test_nuslerp_with_base_slerps_task_vectors():
    g = torch.Generator().manual_seed(4)
    base, a, b = (torch.randn(3, 5, generator=g, dtype=F64) for _ in range(3))
    out = run("nuslerp", [a, base, b], [{"weight": 3.0}, {}, {"weight": 1.0}], base=1)
    close(out, base + slerp_closed_form(0.25, a - base, b - base))
    # quarter circle by hand: task vectors e1 and e2, t = 1/2
    base = T(1.0, 1.0, 1.0)
    out = run("nuslerp", [base, base + T(2.0, 0, 0), base + T(0, 2.0, 0)],
              [{}, {"weight": 1.0}, {"weight": 1.0}], base=0)
    s = 2 * math.sqrt(0.5)
    close(out, T(1 + s, 1 + s, 1.0))


def test_nuslerp_per_row_and_per_column():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(3, 4, generator=g, dtype=F64), torch.randn(3, 4, generator=g, dtype=F64)
    w = [{"weight": 1.0}, {"weight": 1.0}]
    rows = run("nuslerp", [a, b], w, nuslerp_flatten=False)
    close(rows, torch.stack([slerp_closed_form(0.5, a[i], b[i]) for i in range(3)]))
    cols = run("nuslerp", [a, b], w, nuslerp_flatten=False, nuslerp_row_wise=True)
    close(cols, torch.stack([slerp_closed_form(0.5, a[:, j], b[:, j]) for j in range(4)], dim=1))


# ---------------------------------------------------------------- task arithmetic

def test_task_arithmetic_lambda_and_normalize():
    base = T(1.0, 1.0, 1.0)
    a, b = T(2.0, 0.0, 1.0), T(1.0, 3.0, -1.0)  # deltas (1,-1,0) and (0,2,-2)
    params = [{}, {"weight": 0.5}, {"weight": 2.0}]
    out = run("task_arithmetic", [base, a, b], params, base=0)
    close(out, T(1 + 0.5, 1 - 0.5 + 4, 1 - 4))
    out = run("task_arithmetic", [base, a, b], params, base=0, **{"lambda": 0.5})
    close(out, T(1 + 0.25, 1 + 1.75, 1 - 2))
    out = run("task_arithmetic", [base, a, b], params, base=0, normalize=True)
    close(out, T(1 + 0.5 / 2.5, 1 + 3.5 / 2.5, 1 - 4 / 2.5))


# ---------------------------------------------------------------- TIES

# Deltas with distinct magnitudes so the top-k trim is unambiguous (density 0.5 keeps 3 of 6):
#   d1 = [ 3, -1, 0.5, -4,  2, 0.1] -> trimmed t1 = [ 3, 0,   0, -4,  2, 0]
#   d2 = [-2, 2.5,  1, -1.5, -3, 0.2] -> trimmed t2 = [-2, 2.5, 0,  0, -3, 0]
TIES_BASE = T(0.5, -0.5, 1.0, 0.0, 2.0, -1.0)
D1 = T(3.0, -1.0, 0.5, -4.0, 2.0, 0.1)
D2 = T(-2.0, 2.5, 1.0, -1.5, -3.0, 0.2)
TIES_W = [{}, {"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}]


def ties(**params):
    return run("ties", [TIES_BASE, TIES_BASE + D1, TIES_BASE + D2], TIES_W, base=0, **params) - TIES_BASE


def test_ties_trim_elect_disjoint_mean_by_weights():
    # weighted: 1*t1 = [3,0,0,-4,2,0], 0.5*t2 = [-1,1.25,0,0,-1.5,0]; sum [2,1.25,0,-4,0.5,0]
    # elected signs [+,+,+,-,+,+]; agree1 [1,0,0,1,1,0], agree2 [0,1,0,0,0,0]
    # mixed [3,1.25,0,-4,2,0] / agreeing weights [1,0.5,1*,1,1,1*] (*: 0 -> 1)
    close(ties(), T(3.0, 2.5, 0.0, -4.0, 2.0, 0.0), atol=1e-12)


def test_ties_unnormalized_and_lambda():
    close(ties(normalize=False), T(3.0, 1.25, 0.0, -4.0, 2.0, 0.0))
    close(ties(**{"lambda": 2.0}), T(6.0, 5.0, 0.0, -8.0, 4.0, 0.0))


def test_ties_paper_variants():
    # unweighted election: t1 + t2 = [1,2.5,0,-4,-1,0] -> signs [+,+,+,-,-,+]
    # agree1 [1,0,0,1,0,0], agree2 [0,1,0,0,1,0]; mixed [3,1.25,0,-4,-1.5,0]
    close(ties(sign_election="unweighted"), T(3.0, 2.5, 0.0, -4.0, -3.0, 0.0))  # / weights [1,.5,1,1,.5,1]
    close(ties(disjoint_mean="count"), T(3.0, 1.25, 0.0, -4.0, 2.0, 0.0))  # / counts [1,1,1,1,1,1]
    close(ties(sign_election="unweighted", disjoint_mean="count"), T(3.0, 1.25, 0.0, -4.0, -1.5, 0.0))


def test_ties_trim_keeps_top_k_and_at_least_one():
    base = torch.zeros(6, dtype=F64)
    one = run("ties", [base, D1], [{}, {"weight": 1.0, "density": 0.01}], base=0)
    close(one, T(0, 0, 0, -4.0, 0, 0))  # density * 6 < 1: the largest entry alone
    four = run("ties", [base, D2], [{}, {"weight": 1.0, "density": 4 / 6}], base=0)
    close(four, T(-2.0, 2.5, 0, -1.5, -3.0, 0))
    full = run("ties", [base, D2], [{}, {"weight": 1.0, "density": 1.0}], base=0)
    close(full, D2)


# ---------------------------------------------------------------- DARE

def _dense_delta(shape, seed):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(shape, generator=g, dtype=F64)
    return d + d.sign() * 0.01  # no entry is 0, so a zero in the output means dropped


@pytest.mark.parametrize("mode", ["l1", "inverse_density"])
def test_dare_linear_drops_and_rescales(mode):
    base = torch.full((40, 50), 0.25, dtype=F64)
    d = _dense_delta((40, 50), 6)
    density = 0.3
    out = run("dare_linear", [base, base + d], [{}, {"weight": 1.0, "density": density}], base=0, seed=11,
              rescale_mode=mode)
    got = out - base
    kept = got != 0
    frac = kept.double().mean().item()
    assert 0.25 < frac < 0.35  # each entry kept with probability 0.3 (2000 entries)
    if mode == "l1":
        factor = d.abs().sum() / (d * kept).abs().sum()  # L1 norm of the dense delta preserved
    else:
        factor = torch.tensor(1 / density, dtype=F64)
    close(got, torch.where(kept, d * factor, 0.0), atol=1e-12)
    if mode == "l1":
        assert math.isclose(got.abs().sum().item(), d.abs().sum().item(), rel_tol=1e-12)


def test_dare_without_rescale_keeps_values():
    base = torch.zeros(30, 30, dtype=F64)
    d = _dense_delta((30, 30), 7)
    got = run("dare_linear", [base, d], [{}, {"weight": 2.0, "density": 0.5}], base=0, seed=1, rescale=False)
    kept = got != 0
    assert 0.4 < kept.double().mean().item() < 0.6
    close(got, torch.where(kept, 2.0 * d, 0.0))


def test_dare_ties_is_dare_masks_then_ties_consensus():
    base = torch.full((20, 30), -0.5, dtype=F64)
    d1, d2 = _dense_delta((20, 30), 8), _dense_delta((20, 30), 9)
    kwargs = dict(base=0, seed=5, tensor_name="model.layers.1.self_attn.q_proj.weight")
    tensors = [base, base + d1, base + d2]

    # Each input's mask comes from its own (seed, tensor, position) stream, independent of the weights:
    # recover each sparsified delta with the other weight set to 0.
    s1 = run("dare_linear", tensors, [{}, {"weight": 1.0, "density": 0.4}, {"weight": 0.0, "density": 0.6}],
             **kwargs) - base
    s2 = run("dare_linear", tensors, [{}, {"weight": 0.0, "density": 0.4}, {"weight": 1.0, "density": 0.6}],
             **kwargs) - base
    k1, k2 = s1 != 0, s2 != 0
    assert 0.3 < k1.double().mean() < 0.5 and 0.5 < k2.double().mean() < 0.7
    close(s1, torch.where(k1, d1 * d1.abs().sum() / (d1 * k1).abs().sum(), 0.0))
    close(s2, torch.where(k2, d2 * d2.abs().sum() / (d2 * k2).abs().sum(), 0.0))

    w1, w2 = 0.7, 0.4
    out = run("dare_ties", tensors, [{}, {"weight": w1, "density": 0.4}, {"weight": w2, "density": 0.6}],
              **kwargs) - base
    e1, e2 = w1 * s1, w2 * s2
    sign = torch.where(e1 + e2 >= 0, 1.0, -1.0).to(F64)
    expected = torch.where(e1.sign() == sign, e1, 0.0) + torch.where(e2.sign() == sign, e2, 0.0)
    close(out, expected, atol=1e-12)  # dare_ties does not normalize by default
    assert ((e1 != 0) & (e2 != 0) & (e1.sign() != e2.sign())).any()  # the consensus mattered


# ---------------------------------------------------------------- Breadcrumbs

def _ranked_delta():
    # magnitudes 1..20 in a shuffled order with alternating signs
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(3))
    mags = (perm + 1).to(F64)
    return (mags * torch.where(perm % 2 == 0, 1.0, -1.0).to(F64)).reshape(4, 5)


def test_breadcrumbs_drops_outliers_and_smallest():
    d = _ranked_delta()
    base = torch.ones(4, 5, dtype=F64)
    # n = 20, density 0.5 -> keep 10; gamma 0.1 -> drop the 2 largest; so drop the 8 smallest too
    out = run("breadcrumbs", [base, base + d], [{}, {"weight": 1.0, "density": 0.5, "gamma": 0.1}], base=0)
    keep = (d.abs() >= 9) & (d.abs() <= 18)
    assert keep.sum() == 10
    close(out - base, torch.where(keep, d, 0.0))
    # gamma 0: plain top-k by magnitude
    out = run("breadcrumbs", [base, base + d], [{}, {"weight": 2.0, "density": 0.25, "gamma": 0.0}], base=0)
    close(out - base, torch.where(d.abs() >= 16, 2.0 * d, 0.0))


def test_breadcrumbs_rescale_modes():
    d = _ranked_delta()
    base = torch.zeros(4, 5, dtype=F64)
    keep = (d.abs() >= 9) & (d.abs() <= 18)
    mp = [{}, {"weight": 1.0, "density": 0.5, "gamma": 0.1}]
    out = run("breadcrumbs", [base, d], mp, base=0, rescale=True)
    close(out, torch.where(keep, d, 0.0) * (210.0 / sum(range(9, 19))))  # sum 1..20 = 210
    out = run("breadcrumbs", [base, d], mp, base=0, rescale=True, rescale_mode="inverse_density")
    close(out, torch.where(keep, d / 0.5, 0.0))


def test_breadcrumbs_ties_applies_sign_consensus():
    d = _ranked_delta()
    base = torch.zeros(4, 5, dtype=F64)
    mp = [{}, {"weight": 1.0, "density": 0.5, "gamma": 0.1}, {"weight": 1.0, "density": 0.5, "gamma": 0.1}]
    # the second model's delta is -d/2: the same entries survive, with the opposite sign and half the mass
    out = run("breadcrumbs_ties", [base, d, -0.5 * d], mp, base=0)
    keep = (d.abs() >= 9) & (d.abs() <= 18)
    close(out, torch.where(keep, d, 0.0))  # consensus keeps d's sign; no normalization by default
    plain = run("breadcrumbs", [base, d, -0.5 * d], mp, base=0)
    close(plain, torch.where(keep, 0.5 * d, 0.0))


# ---------------------------------------------------------------- DELLA

def test_della_keep_probabilities_follow_magnitude_rank():
    rows, cols, density, eps = 400, 11, 0.5, 0.2
    g = torch.Generator().manual_seed(12)
    mags = torch.stack([torch.randperm(cols, generator=g) for _ in range(rows)]).to(F64) + 1  # distinct per row
    d = mags * torch.where(torch.rand(rows, cols, generator=g) < 0.5, 1.0, -1.0).to(F64)
    base = torch.zeros(rows, cols, dtype=F64)
    out = run("della_linear", [base, d], [{}, {"weight": 1.0, "density": density, "epsilon": eps}], base=0,
              seed=4, rescale_mode="inverse_density")
    kept = out != 0
    # keep probability for magnitude rank r (0 = smallest) of a row: density - eps + 2 eps r/(cols-1);
    # with inverse_density each kept entry is divided by its own probability
    rank = mags - 1
    p = density - eps + 2 * eps * rank / (cols - 1)
    close(out, torch.where(kept, d / p, 0.0), atol=1e-12)
    ratio = (d[kept] / out[kept])
    assert ratio.min() >= density - eps - 1e-12 and ratio.max() <= density + eps + 1e-12
    # the empirical keep rate by rank follows p (400 draws per rank: sd < 0.025)
    rate_low = kept[rank == 0].double().mean().item()
    rate_high = kept[rank == cols - 1].double().mean().item()
    assert abs(rate_low - (density - eps)) < 0.08 and abs(rate_high - (density + eps)) < 0.08
    assert abs(kept.double().mean().item() - density) < 0.04


def test_della_l1_rescale_and_consensus():
    base = torch.zeros(10, 12, dtype=F64)
    d = _dense_delta((10, 12), 13)
    mp = [{}, {"weight": 1.0, "density": 0.4, "epsilon": 0.1}]
    got = run("della_linear", [base, d], mp, base=0, seed=2)
    kept = got != 0
    close(got, torch.where(kept, d * d.abs().sum() / (d * kept).abs().sum(), 0.0))
    # della (consensus + normalize) on a single model: weight divides out
    one = run("della", [base, d], [{}, {"weight": 0.25, "density": 0.4, "epsilon": 0.1}], base=0, seed=2)
    close(one, got)


@pytest.mark.parametrize("density, eps", [(0.9, 0.15), (0.1, 0.15), (0.5, 0.5)])
def test_della_density_epsilon_outside_unit_interval_is_an_error(density, eps):
    base = torch.zeros(4, 4)
    with pytest.raises(ValueError, match=r"density \+/- epsilon must lie in \(0, 1\)"):
        run("della", [base, torch.ones(4, 4)], [{}, {"weight": 1.0, "density": density, "epsilon": eps}], base=0,
            seed=0)
    cfg = {"merge_method": "della", "base_model": "base", "parameters": {"epsilon": eps},
           "models": [{"model": "a", "parameters": {"weight": 1.0, "density": density}}]}
    with pytest.raises(MedmergeError, match="epsilon"):
        medmerge.merge_state_dicts(cfg, {"base": {"w": base}, "a": {"w": torch.ones(4, 4)}})


# ---------------------------------------------------------------- Model Stock

def test_model_stock_formula():
    base = T(1.0, 1.0)
    w1, w2 = base + T(1.0, 1.0), base + T(1.0, 0.0)  # cos 45°
    out = run("model_stock", [base, w1, w2], [{}, {}, {}], base=0)
    c = math.sqrt(0.5)
    t = 2 * c / (1 + c)
    close(out, t * (w1 + w2) / 2 + (1 - t) * base)
    # orthogonal offsets: cos 0 -> t 0 -> the base
    out = run("model_stock", [base, base + T(2.0, 0.0), base + T(0.0, 3.0)], [{}, {}, {}], base=0)
    close(out, base)
    # three models, mean pairwise cosine (1 + 0 + 0)/3 = 1/3: t = 3/3 / (1 + 2/3) = 3/5
    ws = [base + T(1.0, 0.0), base + T(2.0, 0.0), base + T(0.0, 1.0)]
    out = run("model_stock", [base] + ws, [{}] * 4, base=0)
    close(out, 0.6 * sum(ws) / 3 + 0.4 * base)
    # opposite offsets: 1 + (N-1) cos = 0, no finite ratio: keep the base
    out = run("model_stock", [base, base + T(1.0, 2.0), base - T(1.0, 2.0)], [{}, {}, {}], base=0)
    close(out, base)


def test_model_stock_filter_wise_uses_one_ratio_per_row():
    base = torch.zeros(2, 2, dtype=F64)
    w1 = T(1.0, 1.0, 1.0, 0.0).reshape(2, 2)  # row 0 offsets (1,1),(1,0): cos 45°; row 1: (1,0),(0,1): cos 0
    w2 = T(1.0, 0.0, 0.0, 1.0).reshape(2, 2)
    out = run("model_stock", [base, w1, w2], [{}, {}, {}], base=0, filter_wise=True)
    c = math.sqrt(0.5)
    t0 = 2 * c / (1 + c)
    close(out, torch.stack([t0 * (w1[0] + w2[0]) / 2, torch.zeros(2, dtype=F64)]))
    whole = run("model_stock", [base, w1, w2], [{}, {}, {}], base=0)
    assert (whole - out).abs().max() > 1e-3


# ---------------------------------------------------------------- passthrough

def test_passthrough_scale():
    x = T(1.0, -2.0, 3.5)
    close(run("passthrough", [x], [{"scale": None}]), x)
    close(run("passthrough", [x], [{"scale": 2.0}]), T(2.0, -4.0, 7.0))
    close(run("passthrough", [x], [{"scale": -0.5}]), T(-0.5, 1.0, -1.75))
    close(run("passthrough", [x], [{"scale": 0.0}]), T(0.0, 0.0, 0.0))


# ================================================================ whole-merge properties

NAMES = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight",
         "model.layers.1.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight", "model.norm.weight",
         "lm_head.weight"]


def state_dict(seed, dyadic=False, shape=(6, 4)):
    """A 2-layer toy state dict; `dyadic` values are multiples of 1/8 (sums are exact in float32)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in NAMES:
        s = (4,) if name == "model.norm.weight" else shape
        x = torch.randn(s, generator=g)
        out[name] = torch.round(x * 8) / 8 if dyadic else x
    return out


def models(n=3, dyadic=False, shape=(6, 4)):
    sds = {"base": state_dict(100, dyadic, shape)}
    for i, k in enumerate("abc"[:n]):
        delta = state_dict(i, dyadic, shape)
        sds[k] = {name: sds["base"][name] + delta[name] * (0.25 if dyadic else 0.05) for name in NAMES}
    return sds


def test_single_model_with_weight_one_is_the_identity():
    sds = models(1)
    out = medmerge.merge_state_dicts(
        {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}}]}, sds)
    for name in NAMES:
        assert torch.equal(out[name], sds["a"][name]), name
    out = medmerge.merge_state_dicts(
        {"merge_method": "task_arithmetic", "base_model": "base",
         "models": [{"model": "a", "parameters": {"weight": 1.0}}]}, sds)
    for name in NAMES:
        close(out[name], sds["a"][name], atol=1e-6)  # base + (a - base): at most one rounding
    dyadic = models(1, dyadic=True)
    out = medmerge.merge_state_dicts(
        {"merge_method": "task_arithmetic", "base_model": "base",
         "models": [{"model": "a", "parameters": {"weight": 1.0}}]}, dyadic)
    for name in NAMES:
        assert torch.equal(out[name], dyadic["a"][name]), name


SYMMETRIC = {
    "linear": ({}, {"weight": [0.25, 0.75]}),
    "task_arithmetic": ({"lambda": 0.5}, {"weight": [0.5, 0.25]}),
    "ties": ({}, {"weight": [0.5, 1.0], "density": 0.5}),
}


@pytest.mark.parametrize("method", sorted(SYMMETRIC))
@pytest.mark.parametrize("dyadic", [True, False], ids=["exact", "float"])
def test_input_order_does_not_matter(method, dyadic):
    top, first = SYMMETRIC[method]
    sds = models(3, dyadic=dyadic)
    params = {"a": first, "b": {"weight": 0.25, "density": 0.75}, "c": {"weight": 1.0, "density": 0.25}}
    if method == "linear":
        params = {k: {"weight": v["weight"]} for k, v in params.items()}
    elif method == "task_arithmetic":
        params = {k: {"weight": v["weight"]} for k, v in params.items()}

    def cfg(order):
        c = {"merge_method": method, "parameters": top, "models": [{"model": k, "parameters": params[k]} for k in order]}
        if method != "linear":
            c["base_model"] = "base"
        return c

    ref = medmerge.merge_state_dicts(cfg("abc"), sds)
    for order in ("cab", "bca", "acb"):
        out = medmerge.merge_state_dicts(cfg(order), sds)
        for name in NAMES:
            if dyadic:
                assert torch.equal(out[name], ref[name]), (order, name)
            else:
                close(out[name], ref[name], atol=1e-6)
    # and the models are not interchangeable in the result (the weights follow their model)
    swapped = dict(params, a=params["c"], c=params["a"])
    out = medmerge.merge_state_dicts({**cfg("abc"), "models": [{"model": k, "parameters": swapped[k]} for k in "abc"]},
                                     sds)
    assert any(not torch.equal(out[n], ref[n]) for n in NAMES)


def _dare_cfg(seed, density=0.5):
    return {"merge_method": "dare_ties", "base_model": "base", "random_seed": seed,
            "parameters": {"density": density},
            "models": [{"model": "a", "parameters": {"weight": 0.6}}, {"model": "b", "parameters": {"weight": 0.4}}]}


def _merge_with_threads(cfg, sds, threads, global_seed):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        torch.manual_seed(global_seed)  # medmerge must not draw from the global RNG
        return medmerge.merge_state_dicts(cfg, sds)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
@pytest.mark.parametrize(
    "rescale", [{}, {"rescale_mode": "inverse_density"}, {"rescale": False}], ids=["l1", "inverse", "off"]
)
def test_same_seed_identical_output_across_threads_and_global_rng(method, rescale):
    sds = models(2, shape=(256, 192))  # large enough for intra-op parallelism
    before = torch.get_num_threads()
    cfg = _dare_cfg(42)
    cfg["merge_method"] = method
    cfg["parameters"].update(rescale)
    one = _merge_with_threads(cfg, sds, 1, 0)
    two = _merge_with_threads(cfg, sds, 2, 12345)
    assert torch.get_num_threads() == before
    for name in NAMES:
        assert torch.equal(one[name], two[name]), name
    # it did drop entries: zero deltas where both models were dropped
    delta = one["model.layers.0.mlp.up_proj.weight"] - sds["base"]["model.layers.0.mlp.up_proj.weight"]
    assert 0.1 < (delta == 0).double().mean() < 0.4  # about (1 - 0.5)^2 = 0.25, plus sign conflicts


def test_dare_different_seed_different_output():
    sds = models(2)
    a = medmerge.merge_state_dicts(_dare_cfg(1), sds)
    b = medmerge.merge_state_dicts(_dare_cfg(2), sds)
    assert any(not torch.equal(a[n], b[n]) for n in NAMES)
    # each tensor draws its own mask
    masks = [(a[n] - sds["base"][n] == 0) for n in ("model.layers.0.mlp.up_proj.weight",
                                                    "model.layers.1.mlp.up_proj.weight")]
    assert not torch.equal(masks[0], masks[1])
    # density 1 is deterministic: the seed does not matter
    a = medmerge.merge_state_dicts(_dare_cfg(1, 1.0), sds)
    b = medmerge.merge_state_dicts(_dare_cfg(2, 1.0), sds)
    assert all(torch.equal(a[n], b[n]) for n in NAMES)


@pytest.mark.parametrize("method", ["della", "della_linear", "dare_linear"])
def test_random_methods_depend_on_seed(method):
    sds = models(2)
    cfg = {"merge_method": method, "base_model": "base", "parameters": {"density": 0.5, "epsilon": 0.1},
           "models": [{"model": "a", "parameters": {"weight": 0.5}}, {"model": "b", "parameters": {"weight": 0.5}}]}
    if method == "dare_linear":
        del cfg["parameters"]["epsilon"]
    r1 = medmerge.merge_state_dicts({**cfg, "random_seed": 1}, sds)
    r1b = medmerge.merge_state_dicts({**cfg, "random_seed": 1}, sds)
    r2 = medmerge.merge_state_dicts({**cfg, "random_seed": 2}, sds)
    assert all(torch.equal(r1[n], r1b[n]) for n in NAMES)
    assert any(not torch.equal(r1[n], r2[n]) for n in NAMES)


def test_gradient_interpolates_over_layers():
    sds = models(2)
    cfg = {"merge_method": "linear", "parameters": {"normalize": False},
           "models": [{"model": "a", "parameters": {"weight": [0.0, 1.0]}},
                      {"model": "b", "parameters": {"weight": [1.0, 0.0]}}]}
    out = medmerge.merge_state_dicts(cfg, sds)
    for name in NAMES:
        # layer 0 -> t = 0 (b only); layer 1 -> t = 1 (a only); embeddings, norm, lm_head -> t = 0
        want = "a" if ".layers.1." in name else "b"
        assert torch.equal(out[name], sds[want][name]), name


def test_gradient_midpoints_on_three_layers():
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)] + ["model.norm.weight"]
    one = {n: torch.ones(2, 2) for n in names}
    cfg = {"merge_method": "linear", "parameters": {"normalize": False},
           "models": [{"model": "a", "parameters": {"weight": [0.0, 1.0]}}]}
    out = medmerge.merge_state_dicts(cfg, {"a": one})
    # t = 0, 1/2, 1 for layers 0..2; t = 0 outside the layers
    for name, w in zip(names, (0.0, 0.5, 1.0, 0.0)):
        assert torch.equal(out[name], torch.full((2, 2), w)), name
    cfg["models"][0]["parameters"]["weight"] = [0.0, 1.0, 0.0]  # piecewise: peaks at the middle layer
    out = medmerge.merge_state_dicts(cfg, {"a": one})
    for name, w in zip(names, (0.0, 1.0, 0.0, 0.0)):
        assert torch.equal(out[name], torch.full((2, 2), w)), name


def test_filters_pick_the_first_match():
    sds = models(1)
    weight = [{"filter": "mlp", "value": 2.0}, {"filter": "up_proj", "value": 5.0},
              {"filter": "self_attn", "value": [0.5, 3.0]}, {"value": -1.0}]
    cfg = {"merge_method": "linear", "parameters": {"normalize": False},
           "models": [{"model": "a", "parameters": {"weight": weight}}]}
    out = medmerge.merge_state_dicts(cfg, sds)
    expected = {
        "model.layers.0.mlp.up_proj.weight": 2.0,  # "mlp" precedes "up_proj"
        "model.layers.1.mlp.up_proj.weight": 2.0,
        "model.layers.0.self_attn.q_proj.weight": 0.5,  # a gradient inside a filter
        "model.layers.1.self_attn.q_proj.weight": 3.0,
        "model.embed_tokens.weight": -1.0,  # the catch-all
        "model.norm.weight": -1.0,
        "lm_head.weight": -1.0,
    }
    for name, w in expected.items():
        close(out[name], w * sds["a"][name], atol=1e-6)
    # no match and no catch-all: the top-level `parameters` value applies
    cfg = {"merge_method": "linear", "parameters": {"normalize": False, "weight": 0.5},
           "models": [{"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": 2.0}]}}]}
    out = medmerge.merge_state_dicts(cfg, sds)
    close(out["model.layers.0.mlp.up_proj.weight"], 2.0 * sds["a"]["model.layers.0.mlp.up_proj.weight"], atol=1e-6)
    close(out["model.norm.weight"], 0.5 * sds["a"]["model.norm.weight"], atol=1e-6)


# ---------------------------------------------------------------- issue 19's seven (hand computations)

def test_multislerp_of_two_is_the_slerp_midpoint_and_one_model_is_itself():
    a, b = T(3.0, 0.0, 0.0), T(0.0, 1.0, 0.0)  # orthogonal, norms 3 and 1
    out = run("multislerp", [a, b], [{"weight": 1.0}, {"weight": 1.0}])
    # equal weights: the mean direction (a/|a| + b/|b|)/sqrt 2, tangent parts cancel; norm = mean norm 2
    close(out, T(2 / math.sqrt(2), 2 / math.sqrt(2), 0.0), atol=1e-7)
    unit = slerp_closed_form(0.5, a / 3, b)
    close(out, unit * 2, atol=1e-7)
    close(run("multislerp", [a], [{"weight": 0.3}]), a)


def test_multislerp_with_base_interpolates_task_vectors_and_weights_unnormalized():
    base, a, b = T(1.0, 1.0), T(3.0, 1.0), T(1.0, 2.0)  # task vectors (2, 0) and (0, 1)
    out = run("multislerp", [base, a, b], [{}, {"weight": 1.0}, {"weight": 3.0}], base=0)
    # weights 1/4, 3/4: m = (1/4, 3/4)/|.|; tangent sum; exp map; scale 1/4*2 + 3/4*1 = 1.25
    w = [0.25, 0.75]
    m = torch.tensor([0.25, 0.75], dtype=F64)
    m = m / m.norm()
    units = [T(1.0, 0.0), T(0.0, 1.0)]
    tangent = sum(wi * (u - (u @ m) * m) for wi, u in zip(w, units))
    tn = tangent.norm() + 1e-8
    expected = (m * torch.cos(tn) + tangent * torch.sin(tn) / tn) * 1.25 + base
    close(out, expected, atol=1e-7)  # the kernel divides by |v| + eps
    raw = run("multislerp", [base, a, b], [{}, {"weight": 1.0}, {"weight": 3.0}], base=0, normalize_weights=False)
    assert not torch.allclose(raw, out)  # weights 1 and 3 as given: a longer tangent, a larger scale


def test_multislerp_antipodal_inputs_fall_back_or_fail_clearly():
    a, b, c = T(1.0, 0.0), T(-1.0, 0.0), T(0.0, 0.0)
    close(run("multislerp", [a, b], [{"weight": 1.0}, {"weight": 1.0}]), T(0.0, 0.0))  # two: linear
    with pytest.raises(ValueError, match="weighted mean of the unit directions"):
        run("multislerp", [a, b, c], [{"weight": 1.0}, {"weight": 1.0}, {"weight": 1.0}])


def test_karcher_mean_of_two_is_the_geodesic_midpoint_scaled_by_the_mean_norm():
    a, b = T(2.0, 0.0), T(0.0, 4.0)
    out = run("karcher", [a, b], [{}, {}], max_iter=50, tol=1e-12)
    close(out, T(math.sqrt(0.5), math.sqrt(0.5)) * 3.0, atol=1e-9)
    # three directions at 0, 60 and 120 degrees, equal norms: the Karcher mean is the middle one
    dirs = [T(math.cos(t), math.sin(t)) for t in (0.0, math.pi / 3, 2 * math.pi / 3)]
    close(run("karcher", dirs, [{}, {}, {}], max_iter=100, tol=1e-12), dirs[1], atol=1e-9)
    # on a 2-sphere one Riemannian step (max_iter 1) is not yet there: the iteration is really run
    pts = [T(1.0, 0.0, 0.0), T(0.0, 1.0, 0.0), T(0.0, 0.6, 0.8)]
    one, many = (run("karcher", pts, [{}, {}, {}], max_iter=n, tol=1e-12) for n in (1, 100))
    assert not torch.allclose(one, many, atol=1e-6)
    # the fixed point: the weighted log-map sum at the mean vanishes
    m = many / many.norm()
    logs = sum(math.acos(float(u @ m)) / math.sin(math.acos(float(u @ m))) * (u - (u @ m) * m) for u in pts)
    assert float(logs.norm()) < 1e-9


def test_sce_weights_by_mean_square_after_sign_consensus():
    base = T(0.0, 0.0, 0.0, 0.0)
    a, b = T(2.0, -1.0, 0.0, 1.0), T(1.0, 3.0, -2.0, -3.0)
    # c_a = mean(tau_a^2) = 6/4, c_b = 23/4; normalized 6/29, 23/29. Elected signs of the sums (3, 2, -2, -2):
    # +, +, -, -. Agreement: a at 0 (and 3? a=+1 vs - no); b at 0, 1, 2, 3.
    ca, cb = 6 / 29, 23 / 29
    expected = T((ca * 2 + cb * 1) / (ca + cb), 3.0, -2.0, -3.0)
    close(run("sce", [base, a, b], [{}, {}, {}], base=0), expected, atol=1e-12)
    # select_topk 0.5: only the 2 entries whose values vary most across the models (index 1: var 4, index 3: 4)
    # stay; entries 0 and 2 (var 0.25, 1) are zeroed before the consensus
    out = run("sce", [base, a, b], [{}, {}, {}], base=0, select_topk=0.5)
    close(out[[0, 2]], T(0.0, 0.0))
    assert out[1] == 3.0 and out[3] == -3.0


def test_ram_averages_only_where_several_models_changed_the_entry():
    base = T(0.0, 0.0, 0.0, 0.0)
    a, b, c = T(0.5, 0.0, 0.3, 1e-7), T(0.0, 0.2, 0.5, 0.0), T(0.0, 0.0, -0.2, 0.0)
    # entry 0: a alone -> 0.5; 1: b alone -> 0.2; 2: three -> mean 0.2; 3: below epsilon -> 0
    close(run("ram", [base, a, b, c], [{}, {}, {}, {}], base=0), T(0.5, 0.2, 0.2, 0.0), atol=1e-12)
    # ramplus_tl: model a has 1 unique and 1 shared entry (rho 1), b 1 and 1 (rho 1), c 0 unique
    # lambda = 1 + r min(rho, alpha): unique entries scaled, shared ones averaged as RAM
    out = run("ramplus_tl", [base, a, b, c], [{}, {}, {}, {}], base=0, r=0.5, alpha=0.4)
    close(out, T(0.5 * 1.2, 0.2 * 1.2, 0.2, 0.0), atol=1e-7)  # rho is a float32 ratio of counts (as mergekit)


def test_nearswap_takes_the_other_value_where_it_is_close():
    base, other = T(0.0, 0.0, 0.0), T(0.01, 0.1, -1.0)
    # w = clamp(t / |diff|, 0, 1) with t = 0.05: 1, 0.5, 0.05
    close(run("nearswap", [base, other], [{}, {}], base=0, t=0.05), T(0.01, 0.05, -0.05), atol=1e-12)
    close(run("nearswap", [base, other], [{}, {}], base=0, t=0.0), base)


def test_arcee_fusion_keeps_the_changes_above_the_outlier_threshold():
    torch.manual_seed(0)
    base = torch.randn(8, 16, dtype=F64) * 0.1
    other = base.clone()
    other[2, 3] += 2.0  # one large change in a row whose distribution it also moves
    other += torch.randn(8, 16, dtype=F64) * 1e-3
    out = run("arcee_fusion", [base, other], [{}, {}], base=0)
    p, q = torch.softmax(other, -1) + 1e-8, torch.softmax(base, -1) + 1e-8
    importance = (other - base).abs() * (p * (p / q).log()).sum(-1, keepdim=True)
    s = importance.reshape(-1).sort().values
    q1, med, q3 = (s[int(f * (s.numel() - 1))] for f in (0.25, 0.5, 0.75))
    keep = importance >= med + 1.5 * (q3 - q1)
    close(out, torch.where(keep, other, base))
    assert keep[2, 3] and 0 < keep.sum() < keep.numel()


def test_arcee_fusion_samples_quartiles_of_large_tensors_from_the_tensor_seed():
    from medmerge.merging.methods import selective

    g = torch.Generator().manual_seed(1)
    base = torch.randn(1100, 1000, generator=g)
    other = base + torch.randn(1100, 1000, generator=g) * 0.01
    first = run("arcee_fusion", [base, other], [{}, {}], base=0, seed=5, tensor_name="w")
    assert torch.equal(first, run("arcee_fusion", [base, other], [{}, {}], base=0, seed=5, tensor_name="w"))
    assert base.numel() > selective.QUANTILE_SAMPLE
    kept = (first != base).double().mean().item()
    assert 0.0 < kept < 0.2  # outliers only, whatever the sample
    other_seed = run("arcee_fusion", [base, other], [{}, {}], base=0, seed=6, tensor_name="w")
    assert abs((other_seed != base).double().mean().item() - kept) < 0.01  # another sample, about the same share


def test_the_registry_lists_every_method():
    assert len(methods.REGISTRY) == 26
    assert {"multislerp", "karcher", "sce", "ram", "ramplus_tl", "nearswap", "arcee_fusion", "regmean", "fisher", "tsv_m", "iso_c", "iso_cts", "pcb"} <= set(methods.REGISTRY)
