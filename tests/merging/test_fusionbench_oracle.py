"""TSV-M, Iso-C, Iso-CTS, RegMean and Fisher merging against FusionBench's own code.

FusionBench is not a dependency: tests/data/fusionbench/record.py ran its functions (copied with the
commit they come from) on fixed random float64 inputs and stored inputs and outputs in cases.safetensors,
with every case's hyperparameters in cases.json. Here medmerge's kernels run tensor by tensor on the same
inputs, with FusionBench's hyperparameters mapped onto medmerge's parameters.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import medmerge
from medmerge.errors import MedmergeError
from medmerge.merging import methods
from medmerge.merging.methods.base import TensorInputs
from medmerge.merging.methods.subspace import iso_cts_sizes

DATA = Path(__file__).parents[1] / "data" / "fusionbench"
CASES = json.loads((DATA / "cases.json").read_text())["cases"]
TENSORS = load_file(str(DATA / "cases.safetensors"))
SVD_TENSORS = ("layer.weight", "wide.weight", "layer.bias", "square.weight")
TOL = dict(rtol=1e-9, atol=1e-11)


def _run(method: str, tensors, base, model_params, params, name, stats=None):
    spec = methods.get(method).spec
    g = {p.name: p.default for p in spec.global_params}
    g.update(params)
    full = []
    for i, mp in enumerate(model_params):
        d = {p.name: p.default for p in spec.model_params if not p.required}
        d.update(mp)
        full.append(d)
    return methods.get(method)(TensorInputs([t.clone() for t in tensors], base, full, name=name, stats=stats), g)


def _svd_inputs(name):
    return [TENSORS[f"input.svd.base.{name}"]] + [TENSORS[f"input.svd.task{k}.{name}"] for k in range(3)]


def _svd_cases(prefix):
    return [c for c in CASES if c.startswith(prefix)]


def test_the_recorded_cases_name_their_source_commit():
    info = json.loads((DATA / "cases.json").read_text())
    assert info["fusionbench"]["commit"] == "54c9e8c9d9621620c720452cd8533332a32d3689"
    assert {"tsvm_default", "iso_c_default", "iso_cts_default", "regmean_r0p1", "fisher_default"} <= set(CASES)


@pytest.mark.parametrize("case", _svd_cases("tsvm"))
def test_tsv_m_matches_fusionbench(case):
    hp = CASES[case]["hyperparameters"]
    alpha, excluded = hp["alpha"], set(hp["exclude_keys"] or [])
    weights = alpha if isinstance(alpha, list) else [1.0] * 3
    scaling = 1.0 if isinstance(alpha, list) else float(alpha)
    for name in SVD_TENSORS:
        out = _run("tsv_m", _svd_inputs(name), 0, [{}] + [{"weight": w} for w in weights],
                   {"scaling": scaling, "svd": name not in excluded}, name)
        torch.testing.assert_close(out, TENSORS[f"case.{case}.out.{name}"], **TOL, msg=f"{case} {name}")


@pytest.mark.parametrize("case", _svd_cases("iso_c_"))
def test_iso_c_matches_fusionbench(case):
    hp = CASES[case]["hyperparameters"]
    excluded = set(hp["exclude_keys"] or [])
    for name in SVD_TENSORS:
        out = _run("iso_c", _svd_inputs(name), 0, [{}] * 4, {"scaling": hp["scaling_factor"],
                                                            "svd": name not in excluded}, name)
        torch.testing.assert_close(out, TENSORS[f"case.{case}.out.{name}"], **TOL, msg=f"{case} {name}")


@pytest.mark.parametrize("case", _svd_cases("iso_cts"))
def test_iso_cts_matches_fusionbench(case):
    hp = CASES[case]["hyperparameters"]
    for name in SVD_TENSORS:
        out = _run("iso_cts", _svd_inputs(name), 0, [{}] * 4, {"scaling": hp["scaling_factor"],
                                                              "common_space_fraction": hp["common_space_fraction"]},
                   name)
        torch.testing.assert_close(out, TENSORS[f"case.{case}.out.{name}"], **TOL, msg=f"{case} {name}")


def test_iso_cts_sizes_follow_fusionbench_rounding():
    # from the recorded cases' notes: (k, T, f) -> (common, per task)
    assert iso_cts_sizes(8, 3, 0.8) == (5, 1) and iso_cts_sizes(16, 3, 0.8) == (13, 1)
    assert iso_cts_sizes(8, 3, 0.2) == (2, 2) and iso_cts_sizes(16, 3, 0.2) == (4, 4)
    assert iso_cts_sizes(8, 3, 0.5) == (5, 1) and iso_cts_sizes(16, 3, 0.5) == (7, 3)


@pytest.mark.parametrize("case", _svd_cases("regmean"))
def test_regmean_matches_fusionbench(case):
    ratio = CASES[case]["hyperparameters"]["reduce_non_diagonal_ratio"]
    for name in ("layer.weight", "wide.weight", "layer.bias"):
        models = [TENSORS[f"input.regmean.model{k}.{name}"] for k in range(3)]
        module, kind = name.rsplit(".", 1)
        stats = [TENSORS[f"input.regmean.gram{k}.{module}"] for k in range(3)] if kind == "weight" else None
        out = _run("regmean", models, None, [{"stats": "-"}] * 3, {"reduce_non_diagonal_ratio": ratio}, name,
                   stats=stats)
        # FusionBench builds the off-diagonal mask in float32: 0.95 and 0.1 are not exact there (2e-9 apart)
        torch.testing.assert_close(out, TENSORS[f"case.{case}.out.{name}"], rtol=1e-7, atol=1e-8,
                                   msg=f"{case} {name}")


@pytest.mark.parametrize("case", _svd_cases("fisher"))
def test_fisher_matches_fusionbench(case):
    hp = CASES[case]["hyperparameters"]
    params = ("layer.weight", "layer.bias", "wide.weight")
    norms = [math.sqrt(sum(float(TENSORS[f"input.fisher.fisher{k}.{n}"].square().sum()) for n in params))
             for k in range(3)]
    for name in params:
        models = [TENSORS[f"input.fisher.model{k}.{name}"] for k in range(3)]
        stats = [TENSORS[f"input.fisher.fisher{k}.{name}"] for k in range(3)]
        out = _run("fisher", models, None, [{"stats": "-", "fisher_norm": norms[k]} for k in range(3)],
                   {"normalize": hp["normalize_fisher_weight"], "fisher_floor": hp["minimal_fisher_weight"]},
                   name, stats=stats)
        # FusionBench's 1/T coefficients are float32 (they cancel in the ratio, up to rounding)
        torch.testing.assert_close(out, TENSORS[f"case.{case}.out.{name}"], rtol=1e-7, atol=1e-9,
                                   msg=f"{case} {name}")


# ---------------------------------------------------------------- by hand: the papers' properties

def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_iso_c_flattens_the_spectrum_of_the_summed_task_vectors():
    base, t1, t2 = _rand(10, 6, seed=1), _rand(10, 6, seed=2), _rand(10, 6, seed=3)
    out = _run("iso_c", [base, base + t1, base + t2], 0, [{}] * 3, {"scaling": 1.0}, "w")
    s_sum = torch.linalg.svdvals(t1 + t2)
    s_out = torch.linalg.svdvals(out - base)
    torch.testing.assert_close(s_out, torch.full_like(s_out, float(s_sum.mean())), rtol=1e-10, atol=1e-12)
    # the same singular directions as the sum: (out - base) = mean(S) U V^T, so (out - base)^T (t1 + t2) is
    # symmetric positive semi-definite: V diag(mean S * S) V^T
    cross = (out - base).T @ (t1 + t2)
    torch.testing.assert_close(cross, cross.T, rtol=1e-10, atol=1e-10)
    assert torch.linalg.eigvalsh(cross).min() > -1e-9


def test_tsv_m_of_one_task_vector_is_that_task_vector_and_orthogonal_tasks_add_up():
    base, t = _rand(8, 5, seed=4), _rand(8, 5, seed=5)
    one = _run("tsv_m", [base, base + t], 0, [{}, {}], {"scaling": 1.0}, "w")  # r = k: full rank, polar(U) = U
    torch.testing.assert_close(one, base + t, rtol=1e-10, atol=1e-12)
    # two rank-4 task vectors of an 8x8 matrix in orthogonal row and column spaces: each keeps its top
    # int(8 * 1/2) = 4 components, all of it; the stacked factors are already orthonormal (their polar factors
    # are themselves), so TSV-M is plain task arithmetic
    q1, _ = torch.linalg.qr(_rand(8, 8, seed=6))
    q2, _ = torch.linalg.qr(_rand(8, 8, seed=7))
    a = q1[:, :4] @ torch.diag(torch.tensor([3.0, 1.0, 0.7, 0.2], dtype=torch.float64)) @ q2[:, :4].T
    b = q1[:, 4:] @ torch.diag(torch.tensor([2.0, 0.5, 0.4, 0.1], dtype=torch.float64)) @ q2[:, 4:].T
    base = _rand(8, 8, seed=8)
    out = _run("tsv_m", [base, base + a, base + b], 0, [{}] * 3, {"scaling": 1.0}, "w")
    torch.testing.assert_close(out, base + a + b, rtol=1e-10, atol=1e-12)
    # and a vector (1-D) gets the mean of the task vectors, scaled
    v = _run("tsv_m", [T := _rand(4, seed=9), T + 1, T + 3], 0, [{}] * 3, {"scaling": 0.5}, "b")
    torch.testing.assert_close(v, T + 0.5 * 2, rtol=0, atol=1e-12)


def test_iso_cts_with_the_whole_rank_common_is_iso_c():
    base = _rand(9, 7, seed=10)
    inputs = [base, base + _rand(9, 7, seed=11), base + _rand(9, 7, seed=12)]
    cts = _run("iso_cts", inputs, 0, [{}] * 3, {"common_space_fraction": 1.0, "scaling": 0.7}, "w")
    c = _run("iso_c", inputs, 0, [{}] * 3, {"scaling": 0.7}, "w")
    torch.testing.assert_close(cts, c, rtol=1e-10, atol=1e-12)


def test_iso_cts_task_directions_lie_outside_the_common_subspace():
    base = _rand(12, 12, seed=13)
    tvs = [_rand(12, 12, seed=14 + k) for k in range(2)]
    out = _run("iso_cts", [base] + [base + t for t in tvs], 0, [{}] * 3, {"common_space_fraction": 0.5}, "w")
    delta = out - base
    s = torch.linalg.svdvals(delta)
    torch.testing.assert_close(s, torch.full_like(s, float(s.mean())), rtol=1e-9, atol=1e-10)  # isotropic
    common, per_task = iso_cts_sizes(12, 2, 0.5)
    assert (common, per_task) == (6, 3)


# ---------------------------------------------------------------- PCB-merging: the authors' code, whole model

def _svd_models():
    return {name: {t: TENSORS[f"input.svd.{name}.{t}"] for t in SVD_TENSORS} for name in
            ("base", "task0", "task1", "task2")}


@pytest.mark.parametrize("case,params", [
    ("pcb_keysteps_r0p1", {"ratio": 0.1, "clamp_ratio": 0.0001}),
    ("pcb_nlp_r0p2_lam1p2", {"ratio": 0.2, "clamp_ratio": 0.01, "lam": 1.2}),
])
def test_pcb_matches_the_authors_code_on_the_whole_model(case, params):
    hp = CASES[case]["hyperparameters"]
    assert hp.get("pcb_ratio", hp.get("att_ratio")) == params["ratio"] and hp["lam"] == params.get("lam", 1.0)
    config = {"merge_method": "pcb", "base_model": "base", "parameters": params,
              "models": [{"model": f"task{k}"} for k in range(3)], "dtype": "float64"}
    out = medmerge.merge_state_dicts(config, _svd_models())
    for name in SVD_TENSORS:
        torch.testing.assert_close(out[name], TENSORS[f"case.{case}.out.{name}"], rtol=1e-12, atol=1e-12,
                                   msg=f"{case} {name}")


def test_pcb_statistics_are_whole_model_quantities_not_per_tensor():
    from medmerge.merging.methods.pcb import ExactSelection

    values = [_rand(50, seed=20), _rand(7, 3, seed=21), _rand(1000, seed=22) * 3]
    flat = torch.cat([v.reshape(-1) for v in values])
    sel = ExactSelection()
    for v in values:
        sel.count(v)
    ks = [0, 1, 500, flat.numel() - 1]
    sel.target(ks)
    for v in reversed(values):  # any order
        sel.collect(v)
    assert sel.values() == [float(torch.sort(flat).values[k]) for k in ks]
    # float32 with many repeated values (unchanged entries of a bfloat16 fine-tune are exact zeros): exact too
    values = [torch.zeros(30000), _rand(5000, seed=23).float().abs(), torch.full((700,), 0.25), _rand(99, seed=24).float()]
    flat = torch.cat(values)
    sel = ExactSelection()
    for v in values:
        sel.count(v)
    ks = [0, 29999, 30000, 30500, 34000, 35000, flat.numel() - 1]
    sel.target(ks)
    for v in values:
        sel.collect(v)
    assert sel.values() == [float(torch.sort(flat).values[k]) for k in ks]
    assert all(found[0].numel() <= 4096 for found in sel.found)  # distinct values only, whatever the counts
    # a merge of one tensor alone differs from the same tensor merged with the rest of the model
    models = _svd_models()
    alone = medmerge.merge_state_dicts(
        {"merge_method": "pcb", "base_model": "base", "models": [{"model": f"task{k}"} for k in range(3)],
         "dtype": "float64", "parameters": {"ratio": 0.2}},
        {n: {"layer.weight": sd["layer.weight"]} for n, sd in models.items()})
    whole = medmerge.merge_state_dicts(
        {"merge_method": "pcb", "base_model": "base", "models": [{"model": f"task{k}"} for k in range(3)],
         "dtype": "float64", "parameters": {"ratio": 0.2}}, models)
    assert not torch.allclose(alone["layer.weight"], whole["layer.weight"])


def test_pcb_refuses_a_setting_that_keeps_nothing_or_varies_by_tensor():
    config = {"merge_method": "pcb", "base_model": "base", "models": [{"model": f"task{k}"} for k in range(3)],
              "dtype": "float64"}
    with pytest.raises(MedmergeError, match="same|one value"):
        medmerge.merge_state_dicts({**config, "parameters": {"ratio": [{"filter": "wide", "value": 0.3},
                                                                       {"value": 0.2}]}}, _svd_models())
    models = _svd_models()
    models["task1"] = dict(models["base"])  # a task vector of zeros: nothing to clip between
    with pytest.raises(MedmergeError, match="task vector 2"):
        medmerge.merge_state_dicts({**config, "parameters": {"ratio": 0.2}}, models)


@pytest.mark.parametrize("method", ["pcb", "tsv_m", "iso_c", "iso_cts"])
def test_in_memory_merges_never_change_their_input_models(method):
    models = _svd_models()
    before = {n: {t: v.clone() for t, v in sd.items()} for n, sd in models.items()}
    medmerge.merge_state_dicts({"merge_method": method, "base_model": "base", "dtype": "float64",
                                "models": [{"model": f"task{k}"} for k in range(3)]}, models)
    for n, sd in models.items():
        for t, v in sd.items():
            assert torch.equal(v, before[n][t]), (method, n, t)


def test_an_svd_that_does_not_converge_in_float32_is_computed_in_float64(monkeypatch):
    # LAPACK's gesdd failed to converge on a 1B model's up_proj with the common subspace projected out
    # (bench/new_methods_memory.py); the fallback computes the same SVD in float64
    from medmerge.merging.methods import subspace

    real = torch.linalg.svd

    def flaky(a, *args, **kwargs):
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(a, *args, **kwargs)

    a = _rand(9, 5, seed=30).float()
    monkeypatch.setattr(torch.linalg, "svd", flaky)
    u, s, vh = subspace.svd(a)
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    torch.testing.assert_close(u @ torch.diag(s) @ vh, a, rtol=1e-5, atol=1e-6)
    with pytest.raises(torch.linalg.LinAlgError):
        flaky(a.double().float())  # the float32 path really fails here


def test_pcb_streams_row_chunks_in_its_passes_and_its_merge(llama_family, tmp_path, monkeypatch):
    """pcb is elementwise once its whole-model statistics are known: the pre-pass and the merge read row chunks
    (256 elements here, several per tensor) and give the whole-tensor in-memory merge's output."""
    from safetensors.torch import load_file as load

    from medmerge.merging import compute, execute, merge

    config = {"merge_method": "pcb", "base_model": str(llama_family["base"]), "parameters": {"ratio": 0.3},
              "models": [{"model": str(llama_family[k])} for k in ("a", "b", "c")]}
    states = {str(p): load(str(p / "model.safetensors")) for p in (llama_family[k] for k in ("base", "a", "b", "c"))}
    whole = medmerge.merge_state_dicts(config, states)
    sizes = []

    original = compute.row_chunks

    def small(tp, max_elements):
        chunks = original(tp, 256)
        sizes.append(len(chunks))
        return chunks

    monkeypatch.setattr(execute, "row_chunks", small)
    monkeypatch.setattr(compute, "row_chunks", small)
    merge(config, tmp_path / "out", progress=False)
    streamed = load(str(tmp_path / "out" / "model.safetensors"))
    assert max(sizes) > 4
    for name, tensor in whole.items():
        torch.testing.assert_close(streamed[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
