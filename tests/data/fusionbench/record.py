# Reference-output recorder for medmerge's merge-method tests.
#
# This script contains copies of pure tensor functions from two MIT-licensed
# projects; their licence notices follow.
#
# ---------------------------------------------------------------------------
# FusionBench  (https://github.com/tanganke/fusion_bench)
# MIT License
#
# Copyright (c) 2024 Anke Tang
#
# Permission is hereby granted, free of charge, to any person obtaining a copy
# of this software and associated documentation files (the "Software"), to deal
# in the Software without restriction, including without limitation the rights
# to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
# copies of the Software, and to permit persons to whom the Software is
# furnished to do so, subject to the following conditions:
#
# The above copyright notice and this permission notice shall be included in all
# copies or substantial portions of the Software.
#
# THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
# IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
# FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
# AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
# LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
# OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
# SOFTWARE.
# ---------------------------------------------------------------------------
# PCB-merging  (https://github.com/duguodong7/pcb-merging)
# MIT License
#
# Copyright (c) 2024 duguodong
#
# (Same MIT permission notice and disclaimer as above.)
# ---------------------------------------------------------------------------
#
# PCB-merging is NOT part of FusionBench (no PCB or CART code exists anywhere in
# FusionBench's history at the commit below), so the PCB cases are recorded from
# the authors' official repository instead.
#
# All inputs are float64 and are generated with torch.Generator().manual_seed(...).
# Inputs are stored once per input set (`input.<set>.…`) and shared by the
# cases that use them (cases.json says which set each case uses); outputs are
# stored as `case.<case>.out.<tensor>`.
#
# Usage:  python tests/data/fusionbench/record.py   (writes cases.safetensors and
#         cases.json next to this file). Needs only torch and safetensors.

import contextlib
import copy
import json
import math
import os
from collections import OrderedDict, defaultdict
from typing import Dict, Iterable, List, Optional, Union

import torch
from safetensors.torch import save_file
from torch import Tensor

torch.set_num_threads(1)

StateDictType = Dict[str, Tensor]

FB_REPO = "https://github.com/tanganke/fusion_bench"
FB_SHA = "54c9e8c9d9621620c720452cd8533332a32d3689"  # FusionBench v0.2.33 (HEAD of the snapshot)
PCB_REPO = "https://github.com/duguodong7/pcb-merging"
PCB_SHA = "5897888b5d24adfcd33e124793d113746e00f3ff"

HERE = os.path.dirname(os.path.abspath(__file__))


# ===========================================================================
# FusionBench: fusion_bench/utils/state_dict_arithmetic.py @ 54c9e8c9d9621620c720452cd8533332a32d3689
# state_dict_sub / state_dict_add / state_dict_mul, reduced to the code paths
# the merge algorithms use (strict=True key check, device=None, no progress bar).
# ===========================================================================
def state_dict_sub(a: StateDictType, b: StateDictType) -> StateDictType:
    assert set(a.keys()) == set(b.keys())
    result = OrderedDict()
    for key in a.keys():
        result[key] = a[key] - b[key]
    return result


def state_dict_add(a: StateDictType, b: StateDictType) -> StateDictType:
    assert set(a.keys()) == set(b.keys())
    result = OrderedDict()
    for key in a.keys():
        if key in b:
            result[key] = a[key] + b[key]
    return result


def state_dict_mul(state_dict: StateDictType, scalar: float, *, keep_dtype_when_zero: bool = True) -> StateDictType:
    new_state_dict = OrderedDict()
    for key, tensor in state_dict.items():
        if (
            keep_dtype_when_zero
            and not tensor.is_floating_point()
            and (scalar == 0 or torch.all(tensor == 0))
        ):
            new_state_dict[key] = tensor.clone()
        else:
            new_state_dict[key] = scalar * tensor
    return new_state_dict


# ===========================================================================
# TSV-M
# FusionBench: fusion_bench/method/task_singular_vector/utils/TSVM_utils.py @ 54c9e8c9d9621620c720452cd8533332a32d3689
# (verbatim; only the StateDictType import replaced by the alias above)
# ===========================================================================
def compute_and_sum_svd_mem_reduction(
    task_vectors: List[StateDictType],
    exclude_keys: Optional[List[str]] = None,
    accelerator: torch.device = "cuda" if torch.cuda.is_available() else "cpu",
    return_single_task_models: bool = False,
):
    """
    Computes the Singular Value Decomposition (SVD) for each vector in the task_vectors,
    reduces the dimensionality of the vectors based on the sv_reduction factor, and concatenate
    the low-rank matrices. If the vector is not a 2D tensor or is "text_projection", it computes the mean of the vectors.
    Computation of the SVD is performed also for the second operation.
    """
    if exclude_keys is None:
        exclude_keys = []
    num_tasks = len(task_vectors)
    sv_reduction = 1 / num_tasks

    new_vector: Dict[str, Tensor] = {}
    if return_single_task_models:
        single_task_models = [{} for _ in range(num_tasks)]
    for key in task_vectors[0]:
        original_device = task_vectors[0][key].device
        original_dtype = task_vectors[0][key].dtype

        for i, task_vector in enumerate(task_vectors):
            vec = task_vector[key].to(device=accelerator, non_blocking=True)
            if len(task_vector[key].shape) == 2 and key not in exclude_keys:
                # at current, the SVD is not supported for half precision, so we need to convert to float32
                if not (
                    original_dtype == torch.float32 or original_dtype == torch.float64
                ):
                    vec = vec.to(dtype=torch.float32)

                # vec = u @ torch.diag(s) @ vh
                u, s, vh = torch.linalg.svd(vec, full_matrices=False)

                if i == 0:
                    print(f"Computed SVD for {key}...")
                    sum_u = torch.zeros_like(u, device=accelerator)
                    sum_s = torch.zeros_like(s, device=accelerator)
                    sum_vh = torch.zeros_like(vh, device=accelerator)
                reduced_index_s = int(s.shape[0] * sv_reduction)

                # select only the first reduced_index_s columns of u and place them
                sum_u[:, i * reduced_index_s : (i + 1) * reduced_index_s] = u[
                    :, :reduced_index_s
                ]
                sum_s[i * reduced_index_s : (i + 1) * reduced_index_s] = s[
                    :reduced_index_s
                ]
                # select only the first reduced_index_s rows of v and place them
                sum_vh[i * reduced_index_s : (i + 1) * reduced_index_s, :] = vh[
                    :reduced_index_s, :
                ]
            else:
                # if the vector is not a 2D tensor or is in exclude_keys, compute the mean
                if i == 0:
                    new_vector[key] = vec.clone()
                else:
                    new_vector[key] += (vec - new_vector[key]) / (i + 1)

        if len(task_vector[key].shape) == 2 and key not in exclude_keys:
            u_u, s_u, vh_u = torch.linalg.svd(sum_u, full_matrices=False)
            u_vh, s_vh, vh_vh = torch.linalg.svd(sum_vh, full_matrices=False)

            new_vector[key] = torch.linalg.multi_dot(
                (
                    u_u,
                    vh_u,
                    torch.diag(sum_s),
                    u_vh,
                    vh_vh,
                )
            )
            new_vector[key] = new_vector[key].to(
                device=original_device, dtype=original_dtype, non_blocking=True
            )
            if return_single_task_models:
                reduced_index_s = int(sum_s.shape[0] * sv_reduction)
                new_u = u_u @ vh_u
                new_vh = u_vh @ vh_vh
                for i in range(num_tasks):
                    single_task_models[i][key] = torch.linalg.multi_dot(
                        (
                            new_u[:, i * reduced_index_s : (i + 1) * reduced_index_s],
                            torch.diag(
                                sum_s[i * reduced_index_s : (i + 1) * reduced_index_s]
                            ),
                            new_vh[i * reduced_index_s : (i + 1) * reduced_index_s, :],
                        )
                    ).to(
                        device=original_device, dtype=original_dtype, non_blocking=True
                    )
        else:
            new_vector[key] = new_vector[key].to(
                device=original_device, dtype=original_dtype, non_blocking=True
            )
            if return_single_task_models:
                for i in range(num_tasks):
                    single_task_models[i][key] = new_vector[key].clone()

    if not return_single_task_models:
        return new_vector
    else:
        return new_vector, single_task_models


# FusionBench: fusion_bench/method/task_singular_vector/TSVM.py @ 54c9e8c9d9621620c720452cd8533332a32d3689
# TaskSingularVectorMerging.load_pretrained_model_and_task_vectors + .run, with
# the model objects replaced by state dicts (pretrained_model.state_dict() -> base,
# modelpool.load_model(name).state_dict() -> finetuned[i]), accelerator = "cpu",
# return_single_task_models = False.
def tsvm_run(
    base: StateDictType,
    finetuned: List[StateDictType],
    alpha: Optional[Union[float, Iterable[float]]] = 1,  # config default: alpha: 1
    exclude_keys: Optional[List[str]] = None,  # config default: null -> []
) -> StateDictType:
    exclude_keys = exclude_keys if exclude_keys is not None else []
    task_vectors = []
    for model_idx, ft in enumerate(finetuned):
        task_vector = state_dict_sub(ft, base)
        task_vectors.append(task_vector)
        if alpha is not None and isinstance(alpha, Iterable):
            assert len(alpha) == len(finetuned)
            task_vectors[-1] = state_dict_mul(state_dict=task_vectors[-1], scalar=alpha[model_idx])
    with torch.no_grad():
        new_merged_tv = compute_and_sum_svd_mem_reduction(
            task_vectors,
            exclude_keys=exclude_keys,
            accelerator="cpu",
            return_single_task_models=False,
        )
    if alpha is not None and isinstance(alpha, (float, int)):
        new_merged_tv = state_dict_mul(state_dict=new_merged_tv, scalar=alpha)
    # pretrained_model.load_state_dict(state_dict_add(new_merged_tv, pretrained_model.state_dict()))
    return state_dict_add(new_merged_tv, base)


# ===========================================================================
# Iso-C / Iso-CTS
# FusionBench: fusion_bench/method/isotropic_merging/iso_utils.py @ 54c9e8c9d9621620c720452cd8533332a32d3689
# (verbatim; only `timeit_context` replaced by contextlib.nullcontext)
# ===========================================================================
def timeit_context(msg):
    return contextlib.nullcontext()


def iso_c(
    task_vectors: List[StateDictType],
    accelerator="cuda",
    exclude_keys: List[str] = None,
) -> StateDictType:
    exclude_keys = [] if exclude_keys is None else exclude_keys

    with torch.no_grad(), timeit_context("ISO-C Merging"):
        new_vector = {}
        for key in task_vectors[0]:
            print(f"Merging {key}...")
            original_device = task_vectors[0][key].device
            tvs = [
                task_vector[key].to(device=accelerator, non_blocking=True)
                for task_vector in task_vectors
            ]
            num_tvs = len(tvs)
            new_vector[key] = sum(tvs) / num_tvs
            del tvs  # free memory

            if len(task_vectors[0][key].shape) == 2 and key not in exclude_keys:
                # if the key is a 2D matrix, we need to merge the task vectors in the common space
                new_vector[key] *= num_tvs
                U, S, V = torch.linalg.svd(new_vector[key], full_matrices=False)
                S_mean = torch.ones_like(S) * S.mean()

                new_vector[key] = torch.linalg.multi_dot(
                    (
                        U,
                        torch.diag(S_mean),
                        V,
                    )
                )
            new_vector[key] = new_vector[key].to(
                device=original_device, non_blocking=True
            )
    return new_vector


@torch.no_grad()
def iso_cts(
    task_vectors: List[StateDictType],
    common_space_fraction: float,
    accelerator: str = "cuda",
    exclude_keys: List[str] = None,
):
    exclude_keys = [] if exclude_keys is None else exclude_keys
    new_vector = {}

    print("ISO-CTS Merging")
    for key in task_vectors[0]:
        shape_ = task_vectors[0][key].shape
        original_device = task_vectors[0][key].device
        is_2d_matrix = (len(shape_) == 2) and (key not in exclude_keys)
        if not is_2d_matrix:
            print(f"Combining by avg {key}...")
            for i, task_vector in enumerate(task_vectors):
                vec = task_vector[key].to(device=accelerator, non_blocking=True)
                if i == 0:
                    new_vector[key] = vec.clone()
                else:
                    new_vector[key] += (vec - new_vector[key]) / (i + 1)

            # move the new vector to the original device
            new_vector[key] = new_vector[key].to(
                device=original_device, non_blocking=True
            )
            continue

        print(f"Computing common space using sum for {key}...")
        combined_w = sum(
            [
                task_vector[key].to(device=accelerator, non_blocking=True)
                for task_vector in task_vectors
            ]
        )

        ### Calculate the common space size (making sure that task specific space is equally divisible) ###
        common_space_index_s = int(min(shape_) * common_space_fraction)
        _task_specific_total_space_index_s = round(
            (min(shape_) - common_space_index_s) / len(task_vectors)
        ) * len(task_vectors)
        common_space_index_s = min(shape_) - _task_specific_total_space_index_s

        u, s, v = torch.linalg.svd(combined_w, full_matrices=False)
        common_space_u = u[:, :common_space_index_s]
        common_space_s = s[:common_space_index_s]
        common_space_v = v[:common_space_index_s, :]
        ###################################################################

        ### Calculate task specific space ###
        n_dims_per_task = int((min(shape_) - common_space_index_s) / len(task_vectors))
        for i, task_vector in enumerate(task_vectors):
            w = task_vector[key].to(device=accelerator)

            # calculate the projection onto task specific space to remove the common space
            w_ts = w - common_space_u @ common_space_u.T @ w
            u_ts, s_ts, v_ts = torch.linalg.svd(w_ts, full_matrices=False)

            if i == 0:
                combined_space_u = torch.zeros_like(u_ts, device=accelerator)
                combined_space_s = torch.zeros_like(s_ts, device=accelerator)
                combined_space_v = torch.zeros_like(v_ts, device=accelerator)

            combined_space_u[:, i * n_dims_per_task : (i + 1) * n_dims_per_task] = u_ts[
                :, :n_dims_per_task
            ]
            combined_space_s[i * n_dims_per_task : (i + 1) * n_dims_per_task] = s_ts[
                :n_dims_per_task
            ]
            combined_space_v[i * n_dims_per_task : (i + 1) * n_dims_per_task, :] = v_ts[
                :n_dims_per_task, :
            ]
        ###################################################################

        combined_space_u[
            :,
            len(task_vectors) * n_dims_per_task : len(task_vectors) * n_dims_per_task
            + common_space_index_s,
        ] = common_space_u
        combined_space_s[
            len(task_vectors) * n_dims_per_task : len(task_vectors) * n_dims_per_task
            + common_space_index_s
        ] = common_space_s
        combined_space_v[
            len(task_vectors) * n_dims_per_task : len(task_vectors) * n_dims_per_task
            + common_space_index_s,
            :,
        ] = common_space_v

        ### Orthogonalize combined_space_u and combined_space_v ###
        u_combined_space_u, s_combined_space_u, v_combined_space_u = torch.linalg.svd(
            combined_space_u, full_matrices=False
        )
        u_combined_space_v, s_combined_space_v, v_combined_space_v = torch.linalg.svd(
            combined_space_v, full_matrices=False
        )
        combined_space_u = u_combined_space_u @ v_combined_space_u
        combined_space_v = u_combined_space_v @ v_combined_space_v
        ###################################################################

        combined_space_s = torch.ones_like(combined_space_s) * combined_space_s.mean()

        new_vector[key] = torch.linalg.multi_dot(
            (
                combined_space_u,
                torch.diag(combined_space_s),
                combined_space_v,
            )
        )
        new_vector[key] = new_vector[key].to(device=original_device, non_blocking=True)

    return new_vector


def check_parameterNamesMatch(checkpoints):
    parameter_names = set(checkpoints[0].keys())

    if len(checkpoints) >= 2:
        # raise ValueError("Number of models is less than 2.")
        for checkpoint in checkpoints[1:]:
            current_parameterNames = set(checkpoint.keys())
            if current_parameterNames != parameter_names:
                raise ValueError(
                    "Differing parameter names in models. "
                    f"The different parameters are {parameter_names.symmetric_difference(current_parameterNames)}"
                )


# FusionBench: fusion_bench/method/isotropic_merging/iso.py @ 54c9e8c9d9621620c720452cd8533332a32d3689
# IsotropicMergingInCommonSubspace.run / IsotropicMergingInCommonAndTaskSubspace.run
# with models replaced by state dicts and accelerator = "cpu".
def iso_c_run(base, finetuned, scaling_factor=1.0, exclude_keys=None):
    with torch.no_grad():
        task_vectors = [state_dict_sub(ft, base) for ft in finetuned]
        check_parameterNamesMatch(task_vectors)
    merged_tv = iso_c(task_vectors, accelerator="cpu", exclude_keys=exclude_keys)
    # merged_parameters = pretrained_parameters + scaling_factor * merged_task_vector
    return state_dict_add(base, state_dict_mul(merged_tv, scaling_factor))


def iso_cts_run(base, finetuned, scaling_factor=1.0, common_space_fraction=0.8, exclude_keys=None):
    with torch.no_grad():
        task_vectors = [state_dict_sub(ft, base) for ft in finetuned]
        check_parameterNamesMatch(task_vectors)
    merged_tv = iso_cts(
        task_vectors,
        common_space_fraction=common_space_fraction,
        accelerator="cpu",
        exclude_keys=exclude_keys,
    )
    return state_dict_add(base, state_dict_mul(merged_tv, scaling_factor))


# ===========================================================================
# PCB-merging (official repository, NOT FusionBench)
# ===========================================================================
# PCB-merging: nlp_source_code/utils/merge_utils.py @ 5897888b5d24adfcd33e124793d113746e00f3ff
# (verbatim; identical helpers also in pcb-merging.py and vision_source_code/pcb.py)
def state_dict_to_vector(state_dict, remove_keys=[]):
    shared_state_dict = copy.deepcopy(state_dict)
    for key in remove_keys:
        if key in shared_state_dict:
            del shared_state_dict[key]
    sorted_shared_state_dict = OrderedDict(sorted(shared_state_dict.items()))
    return torch.nn.utils.parameters_to_vector(
        [value.reshape(-1) for key, value in sorted_shared_state_dict.items()]
    )


def vector_to_state_dict(vector, state_dict, remove_keys=[]):
    # create a reference dict to define the order of the vector
    reference_dict = copy.deepcopy(state_dict)
    for key in remove_keys:
        if key in reference_dict:
            del reference_dict[key]
    sorted_reference_dict = OrderedDict(sorted(reference_dict.items()))

    # create a shared state dict using the refence dict
    torch.nn.utils.vector_to_parameters(vector, sorted_reference_dict.values())

    # add back the encoder and decoder embedding weights.
    if "transformer.shared.weight" in sorted_reference_dict:
        for key in remove_keys:
            sorted_reference_dict[key] = sorted_reference_dict[
                "transformer.shared.weight"
            ]
    return sorted_reference_dict


def normalize(x, dim=0):
    min_values, _ = torch.min(x, dim=dim, keepdim=True)
    max_values, _ = torch.max(x, dim=dim, keepdim=True)
    y = (x - min_values) / (max_values - min_values)
    return y


def clamp(x, min_ratio=0, max_ratio=0):
    if len(x.size())==1:
        d = x.size(0)
        sorted_x, _ = torch.sort(x)
        min=sorted_x[int(d * min_ratio)]
        max=sorted_x[int(d * (1-max_ratio)-1)]
    else:
        d = x.size(1)
        sorted_x, _ = torch.sort(x, dim=1)
        min=sorted_x[:, int(d * min_ratio)].unsqueeze(1)
        max=sorted_x[:, int(d * (1-max_ratio)-1)].unsqueeze(1)
    clamped_x= torch.clamp(x, min, max)
    return clamped_x


def act(x):
    y = torch.tanh(x)  # x**7; torch.relu(x)
    return y


# PCB-merging: pcb-merging.py @ 5897888b5d24adfcd33e124793d113746e00f3ff  (verbatim)
# ("Key Steps in Our Proposed PCB-Merging" per the repo readme)
def PCB_merge(flat_task_checks, pcb_ratio=0.1):
    all_checks = flat_task_checks.clone()
    n, d = all_checks.shape   
    all_checks_abs = clamp(torch.abs(all_checks), min_ratio=0.0001, max_ratio=0.0001)
    clamped_all_checks = torch.sign(all_checks)*all_checks_abs
    self_pcb = normalize(all_checks_abs, 1)**2
    self_pcb_act = torch.exp(n*self_pcb)
    cross_pcb = all_checks * torch.sum(all_checks, dim=0)
    cross_pcb_act = act(cross_pcb)
    task_pcb = self_pcb_act * cross_pcb_act

    scale = normalize(clamp(task_pcb, 1-pcb_ratio, 0), dim=1)
    tvs = clamped_all_checks
    merged_tv = torch.sum(tvs * scale, dim=0) / torch.clamp(torch.sum(scale, dim=0), min=1e-12)
    return merged_tv, clamped_all_checks, scale


# PCB-merging: nlp_source_code/utils/merge_utils.py @ 5897888b5d24adfcd33e124793d113746e00f3ff  (verbatim)
# (used by nlp_source_code/merging.py for merge_function "TPA_<ratio%>_<lambda_code>")
def task_para_att_merge(flat_task_checks, att_ratio=0.1):
    all_checks = flat_task_checks.clone()
    n, d = all_checks.shape   
    all_checks_abs = clamp(torch.abs(all_checks), min_ratio=0.01, max_ratio=0.01)
    clamped_all_checks = torch.sign(all_checks)*all_checks_abs
    self_att = normalize(all_checks_abs, 1)**2
    self_att_act = torch.exp(n*self_att)
    cross_att = all_checks * torch.sum(all_checks, dim=0)
    cross_att_act = act(cross_att)
    task_att = self_att_act * cross_att_act

    scale = normalize(clamp(task_att, 1-att_ratio, 0), dim=1)
    tvs = clamped_all_checks
    merged_tv = torch.sum(tvs * scale, dim=0) / torch.clamp(torch.sum(scale, dim=0), min=1e-12)
    return merged_tv, clamped_all_checks, scale


# PCB-merging: vision_source_code/pcb.py @ 5897888b5d24adfcd33e124793d113746e00f3ff
# body of `if __name__ == "__main__":` wrapped in a function (att_ratio and lams
# made parameters; their values in the file are 0.05 and 1.2 for every task).
def pcb_vision_main(tv_flat_checks, att_ratio=0.05, lams=None):
    all_checks = tv_flat_checks
    n, d = all_checks.shape    # d = 113448705
    all_checks_abs = clamp(torch.abs(all_checks), min_ratio=0.01, max_ratio=0.01)
    clamped_all_checks = torch.sign(all_checks)*all_checks_abs
    all_checks_normalized = torch.sign(all_checks) * normalize(all_checks_abs, dim=1)
    intra = normalize(all_checks_abs, 1)**2
    intra = torch.exp(n*intra)
    inter = all_checks * torch.sum(all_checks_normalized, dim=0)
    inter = act(inter)
    balancing = intra * inter
    scale = normalize(clamp(balancing, 1-att_ratio, 0), dim=1)
    if lams is None:
        lams = [1.2] * n
    # original: lams = torch.tensor([1.2, ...]).unsqueeze(1) (a float32 literal); built in the
    # vectors' dtype here so float64 reimplementations can match to ~1e-15
    lams = torch.tensor(lams, dtype=all_checks.dtype).unsqueeze(1)
    tvs = clamped_all_checks * lams
    merged_tv = torch.sum(tvs * scale, dim=0) / torch.clamp(torch.sum(scale, dim=0), min=1e-12)
    return merged_tv


# PCB-merging: vision_source_code/pcb_ES.py @ 5897888b5d24adfcd33e124793d113746e00f3ff
# PCB (verbatim) + the merging lines of compute_acc (per-task lams).
def PCB(all_checks, pcb_ratio):
    n, d = all_checks.shape    # d = 113448705
    all_checks_abs = clamp(torch.abs(all_checks), min_ratio=0.01, max_ratio=0.01)
    clamped_all_checks = torch.sign(all_checks)*all_checks_abs
    all_checks_normalized = torch.sign(all_checks) * normalize(all_checks_abs, dim=1)
    intra = normalize(all_checks_abs, 1)**2
    intra = torch.exp(n*intra)
    inter_score = []
    for i in range(n):
        score_i = torch.tanh(all_checks_normalized[i] * all_checks_normalized)
        inter_i = torch.sum(score_i, dim=0)
        inter_score.append(inter_i)
        
    inter = torch.vstack(inter_score)
    balancing = intra * inter
    scale = normalize(clamp(balancing, 1-pcb_ratio, 0), dim=1)
    return clamped_all_checks, scale


def pcb_es_merge(tv_flat_checks, pcb_ratio, lams):
    all_checks, scale = PCB(tv_flat_checks, pcb_ratio=pcb_ratio)
    # compute_acc(lams, all_checks, scale, flat_ptm, ...):
    # lams come from nevergrad (a float64 numpy array) in the original, hence float64 here
    tvs = all_checks * torch.tensor(lams, dtype=torch.float64).unsqueeze(1)
    merged_tv = torch.sum(tvs * scale, dim=0) / torch.clamp(torch.sum(scale, dim=0), min=1e-12)
    return merged_tv


# PCB-merging: nlp_source_code/merging.py + utils/merge_utils.py load_t5/load_vit @ 5897888b5d24adfcd33e124793d113746e00f3ff
# The driver: flatten every (non-removed) tensor of every checkpoint into one
# vector (keys sorted), tv = flat_ft - flat_ptm, merge over the WHOLE vector,
# merged_check = flat_ptm + lam * merged_tv, unflatten.
def pcb_run(base, finetuned, merge_fn, lam=1.0, remove_keys=()):
    remove_keys = list(remove_keys)
    flat_ft = torch.vstack([state_dict_to_vector(check, remove_keys) for check in finetuned])
    flat_ptm = state_dict_to_vector(base, remove_keys)
    tv_flat_checks = flat_ft - flat_ptm
    merged_tv = merge_fn(tv_flat_checks)
    merged_check = flat_ptm + lam * merged_tv
    reference_state_dict = finetuned[0]
    return dict(vector_to_state_dict(merged_check, reference_state_dict, remove_keys=remove_keys))


# ===========================================================================
# RegMean
# FusionBench: fusion_bench/method/regmean/regmean.py @ 54c9e8c9d9621620c720452cd8533332a32d3689  (verbatim)
# ===========================================================================
def reduce_non_diagonal_elements(
    regmean_weights: torch.Tensor, reduce_non_diagonal_ratio: float
):
    """
    reduce the non-diagonal elements in regmean_weights
    """
    # diagonal matrix with (1 - reduce_non_diagonal_ratio) as elements
    diag_weights = torch.diag(
        torch.ones(regmean_weights.shape[0]) - reduce_non_diagonal_ratio
    ).to(regmean_weights.device)
    # matrix with reduce_non_diagonal_ratio as elements
    non_diag_weights = torch.zeros_like(diag_weights).fill_(reduce_non_diagonal_ratio)
    # diagonal elements are unchanged, while non-diagonal elements are multiplied by reduce_non_diagonal_ratio
    return regmean_weights * (diag_weights + non_diag_weights)


def merging_with_regmean_weights(
    models_to_merge_param_dict: dict,
    models_to_merge_regmean_weights_list: list,
    reduce_non_diagonal_ratio: float = 1.0,
    weight_transpose: bool = True,
):
    """
    merge parameters of different models with computed regmean weights
    """
    # dict, dictionary of model parameters
    merged_params = {}

    for param_name, param_value_list in models_to_merge_param_dict.items():
        merged_by_regmean = False
        # only perform regmean merging on the "weight" parameter of Linear module
        if param_name.endswith(".weight"):
            module_name = param_name[: -len(".weight")]
            if module_name in models_to_merge_regmean_weights_list[0].keys():
                # two lists with length num_models_to_merge
                param_multiplied_results, module_regmean_weights_list = [], []
                for model_idx, model_to_merge_regmean_weights in enumerate(
                    models_to_merge_regmean_weights_list
                ):
                    # Tensor, shape (hidden_dim, hidden_dim)
                    module_regmean_weights = model_to_merge_regmean_weights[module_name]

                    # reduce non-diagonal elements
                    module_regmean_weights = reduce_non_diagonal_elements(
                        regmean_weights=module_regmean_weights,
                        reduce_non_diagonal_ratio=reduce_non_diagonal_ratio,
                    )
                    module_regmean_weights_list.append(module_regmean_weights)

                    model_to_merge_param = param_value_list[model_idx]
                    # since the weight shape of Linear module is (output_size, input_size), we need to transpose it
                    param_multiplied_results.append(
                        torch.matmul(
                            module_regmean_weights,
                            (
                                model_to_merge_param.transpose(0, 1)
                                if weight_transpose
                                else model_to_merge_param
                            ),
                        )
                    )

                # sum up module_regmean_weights and param_multiplied_results over all individual models
                sum_module_regmean_weights = sum(module_regmean_weights_list)
                sum_param_multiplied_results = sum(param_multiplied_results)

                # get the inverse matrix
                inv_sum_module_regmean_weights = torch.inverse(
                    sum_module_regmean_weights
                )
                # merge parameters with regmean
                merged_param = torch.matmul(
                    inv_sum_module_regmean_weights, sum_param_multiplied_results
                )
                # transpose to the original shape of "weight" in Linear module
                merged_params[param_name] = (
                    merged_param.transpose(0, 1) if weight_transpose else merged_param
                )
                merged_by_regmean = True
        # use average merging for parameters whose names are not end with ".weight" or not in Linear module
        if not merged_by_regmean:
            merged_params[param_name] = torch.stack(param_value_list, dim=0).mean(dim=0)

    return merged_params


# FusionBench: fusion_bench/method/regmean/clip_regmean.py @ 54c9e8c9d9621620c720452cd8533332a32d3689
# the forward hook's gram computation for a single batch: x.reshape(-1, in) ;
# regmean_weights[module] = x^T x / x.shape[0]   (an AVERAGED gram matrix).
def regmean_gram_from_inputs(x: Tensor) -> Tensor:
    x = x.reshape(-1, x.shape[-1])
    xtx = torch.matmul(x.transpose(0, 1), x)
    return xtx / x.shape[0]


# ===========================================================================
# Fisher merging
# FusionBench: fusion_bench/method/fisher_merging/fisher_merging.py @ 54c9e8c9d9621620c720452cd8533332a32d3689  (verbatim)
# ===========================================================================
def get_models_fisher_norm(
    models_to_merge_param_dict: dict, models_to_merge_fisher_weights_list: list
) -> Tensor:
    # dict, key is parameter name, value is a Tensor with shape (num_models_to_merge, )
    models_fisher_norm_dict = {}
    # compute L2 norm over models for each parameter
    for param_name, _ in models_to_merge_param_dict.items():
        # Tensor, shape (num_models_to_merge, *fisher_weight_shape)
        models_fisher = torch.stack(
            [
                model_to_merge_fisher_weights[param_name]
                for model_to_merge_fisher_weights in models_to_merge_fisher_weights_list
            ],
            dim=0,
        )
        dims = [dim_idx for dim_idx in range(1, models_fisher.dim())]
        # Tensor, shape (num_models_to_merge, ), compute L2 norm for each parameter
        models_fisher_norm = torch.linalg.vector_norm(models_fisher, dim=dims)
        models_fisher_norm_dict[param_name] = models_fisher_norm

    # Tensor, shape (num_models_to_merge, num_parameters)
    models_fisher_norm = torch.stack(
        [models_fisher_norm for models_fisher_norm in models_fisher_norm_dict.values()],
        dim=1,
    )
    # Tensor, shape (num_models_to_merge, ), compute L2 norm over all the parameters
    models_fisher_norm = torch.norm(models_fisher_norm, dim=1)
    return models_fisher_norm


def merging_with_fisher_weights(
    models_to_merge_param_dict: Dict[str, List[Tensor]],
    models_to_merge_fisher_weights_list: list,
    fisher_scaling_coefficients: torch.Tensor,
    normalize_fisher_weight: bool = True,
    minimal_fisher_weight: float = 1e-6,
) -> Dict[str, Tensor]:
    # dict, dictionary of model parameters
    merged_params = {}

    if normalize_fisher_weight:
        # Tensor, shape (num_models_to_merge, ), L2 norm over all the parameters of models that need to be merged
        models_fisher_norm = get_models_fisher_norm(
            models_to_merge_param_dict=models_to_merge_param_dict,
            models_to_merge_fisher_weights_list=models_to_merge_fisher_weights_list,
        )

    for param_name, param_value_list in models_to_merge_param_dict.items():
        # shape (num_models_to_merge, *parameter_shape)
        param_values = torch.stack(param_value_list, dim=0)
        # Tensor, shape (num_models_to_merge, *fisher_weight_shape), use minimal_fisher_weight to solve the potential numerical issues
        models_to_merge_fisher_weights = (
            torch.stack(
                [
                    model_to_merge_fisher_weights[param_name]
                    for model_to_merge_fisher_weights in models_to_merge_fisher_weights_list
                ],
                dim=0,
            )
            + minimal_fisher_weight
        )

        # Tensor, shape (num_models_to_merge, 1, 1, ...)
        reshaped_scaling_coefficients = fisher_scaling_coefficients.reshape(
            -1, *[1 for _ in range(param_values.dim() - 1)]
        ).to(param_values.device)

        if normalize_fisher_weight:
            # Tensor, shape (num_models_to_merge, )
            _models_fisher_norm = 1.0 / (models_fisher_norm + minimal_fisher_weight)
            normalized_models_fisher_norm = (
                _models_fisher_norm / _models_fisher_norm.sum()
            )
            normalized_models_fisher_norm = normalized_models_fisher_norm.reshape(
                -1, *[1 for _ in range(param_values.dim() - 1)]
            )
            reshaped_scaling_coefficients = (
                reshaped_scaling_coefficients * normalized_models_fisher_norm
            )

        # shape (*parameter_shape)
        numerator = (
            reshaped_scaling_coefficients
            * models_to_merge_fisher_weights
            * param_values
        ).sum(dim=0)

        # shape (*parameter_shape)
        denominator = (
            reshaped_scaling_coefficients * models_to_merge_fisher_weights
        ).sum(dim=0)

        merged_param = numerator / denominator
        merged_params[param_name] = merged_param
    return merged_params


# ===========================================================================
# Fixed inputs (float64)
# ===========================================================================
DTYPE = torch.float64
SVD_SHAPES = OrderedDict(
    [
        ("layer.weight", (12, 8)),
        ("wide.weight", (8, 20)),  # wide: rows < cols
        ("layer.bias", (8,)),  # 1-D
        ("square.weight", (16, 16)),
    ]
)
NUM_TASKS = 3


def make_set(seed, shapes, tv_scale=0.1):
    g = torch.Generator().manual_seed(seed)
    base = OrderedDict((k, torch.randn(s, generator=g, dtype=DTYPE)) for k, s in shapes.items())
    tasks = []
    for _ in range(NUM_TASKS):
        tasks.append(
            OrderedDict((k, base[k] + tv_scale * torch.randn(s, generator=g, dtype=DTYPE)) for k, s in shapes.items())
        )
    return base, tasks


def main():
    tensors: Dict[str, Tensor] = {}
    meta = {
        "description": "Reference outputs of FusionBench (TSV-M, Iso-C, Iso-CTS, RegMean, Fisher) and of the official "
        "PCB-merging code on fixed random float64 inputs. Recorded by record.py in this folder.",
        "fusionbench": {"repository": FB_REPO, "commit": FB_SHA, "version": "0.2.33", "license": "MIT (c) 2024 Anke Tang"},
        "pcb_merging": {
            "repository": PCB_REPO,
            "commit": PCB_SHA,
            "license": "MIT (c) 2024 duguodong",
            "note": "PCB-merging (and CART) are not implemented in FusionBench; PCB cases use the authors' code.",
        },
        "torch_version": torch.__version__,
        "dtype": "float64",
        "naming": {
            "inputs": "input.<set>.base.<tensor>, input.<set>.task<k>.<tensor> (k=0..2, fine-tuned weights, "
            "not deltas); regmean/fisher sets: input.<set>.model<k>.<param>, input.<set>.gram<k>.<module>, "
            "input.<set>.fisher<k>.<param>, input.<set>.x<k>.<module> (activations the gram was built from)",
            "outputs": "case.<case>.out.<tensor> = the full merged weights (base already added back where the method does so)",
        },
        "input_sets": {},
        "cases": {},
    }

    # ---------------- input set "svd": base + 3 fine-tuned models ----------------
    base, tasks = make_set(20250101, SVD_SHAPES)
    meta["input_sets"]["svd"] = {
        "seed": 20250101,
        "generation": "g=torch.Generator().manual_seed(seed); for each tensor in order: base=randn(shape); then for "
        "each task k, for each tensor in order: task_k = base + 0.1*randn(shape) (all float64)",
        "tensors": {k: list(s) for k, s in SVD_SHAPES.items()},
        "num_tasks": NUM_TASKS,
    }
    for k, v in base.items():
        tensors[f"input.svd.base.{k}"] = v
    for i, t in enumerate(tasks):
        for k, v in t.items():
            tensors[f"input.svd.task{i}.{k}"] = v

    def add_case(name, inputs, method, params, source, out, notes=None):
        for k, v in out.items():
            tensors[f"case.{name}.out.{k}"] = v.contiguous()
        entry = {"method": method, "inputs": inputs, "hyperparameters": params, "dtype": "float64", "source": source}
        if notes:
            entry["notes"] = notes
        meta["cases"][name] = entry

    tsvm_src = [
        "fusion_bench/method/task_singular_vector/TSVM.py (TaskSingularVectorMerging.run)",
        "fusion_bench/method/task_singular_vector/utils/TSVM_utils.py (compute_and_sum_svd_mem_reduction)",
        "config/method/task_singular_vector/TaskSingularVectorMerging.yaml",
    ]
    # ---- TSV-M ----
    add_case("tsvm_default", "svd", "TSV-M (TaskSingularVectorMerging)",
             {"alpha": 1, "exclude_keys": [], "return_single_task_models": False}, tsvm_src,
             tsvm_run(base, tasks, alpha=1, exclude_keys=None))
    add_case("tsvm_alpha0p7", "svd", "TSV-M (TaskSingularVectorMerging)",
             {"alpha": 0.7, "exclude_keys": [], "return_single_task_models": False}, tsvm_src,
             tsvm_run(base, tasks, alpha=0.7, exclude_keys=None),
             "scalar alpha multiplies the whole merged task vector (incl. 1-D means) after SVD merging")
    add_case("tsvm_alphalist_exclude_square", "svd", "TSV-M (TaskSingularVectorMerging)",
             {"alpha": [0.5, 1.0, 1.5], "exclude_keys": ["square.weight"], "return_single_task_models": False},
             tsvm_src,
             tsvm_run(base, tasks, alpha=[0.5, 1.0, 1.5], exclude_keys=["square.weight"]),
             "list alpha scales each task vector BEFORE the SVD; no scaling afterwards; excluded 2-D key is "
             "averaged like a 1-D tensor")

    # ---- Iso-C ----
    iso_src = [
        "fusion_bench/method/isotropic_merging/iso.py",
        "fusion_bench/method/isotropic_merging/iso_utils.py (iso_c / iso_cts)",
        "config/method/isotropic_merging/iso_c.yaml",
        "config/method/isotropic_merging/iso_cts.yaml",
    ]
    add_case("iso_c_default", "svd", "Iso-C (IsotropicMergingInCommonSubspace)",
             {"scaling_factor": 1.0, "exclude_keys": None}, iso_src,
             iso_c_run(base, tasks, scaling_factor=1.0))
    add_case("iso_c_s1p3_exclude_square", "svd", "Iso-C (IsotropicMergingInCommonSubspace)",
             {"scaling_factor": 1.3, "exclude_keys": ["square.weight"]}, iso_src,
             iso_c_run(base, tasks, scaling_factor=1.3, exclude_keys=["square.weight"]))

    # ---- Iso-CTS ----
    add_case("iso_cts_default", "svd", "Iso-CTS (IsotropicMergingInCommonAndTaskSubspace)",
             {"scaling_factor": 1.0, "common_space_fraction": 0.8, "exclude_keys": None}, iso_src,
             iso_cts_run(base, tasks, scaling_factor=1.0, common_space_fraction=0.8),
             "min(shape)=8 -> common=5, per-task=1; min(shape)=16 -> common=13, per-task=1")
    add_case("iso_cts_f0p2_s1p5", "svd", "Iso-CTS (IsotropicMergingInCommonAndTaskSubspace)",
             {"scaling_factor": 1.5, "common_space_fraction": 0.2, "exclude_keys": None}, iso_src,
             iso_cts_run(base, tasks, scaling_factor=1.5, common_space_fraction=0.2),
             "min(shape)=8 -> common=2, per-task=2; min(shape)=16 -> common=4, per-task=4")
    add_case("iso_cts_f0p5", "svd", "Iso-CTS (IsotropicMergingInCommonAndTaskSubspace)",
             {"scaling_factor": 1.0, "common_space_fraction": 0.5, "exclude_keys": None}, iso_src,
             iso_cts_run(base, tasks, scaling_factor=1.0, common_space_fraction=0.5),
             "round() pushes the task space up: min=8 -> int(4)=4, round(4/3)*3=3 -> common=5, per-task=1; "
             "min=16 -> int(8)=8, round(8/3)=3 -> 9 -> common=7, per-task=3")

    # ---- PCB (official repo; whole flattened model vector) ----
    pcb_note = ("All tensors of the model (incl. 1-D) are flattened (keys sorted) into ONE vector per task; every "
                "quantile/min/max in PCB is taken over that whole vector. out = base + lam * merged_tv.")
    add_case("pcb_keysteps_r0p1", "svd", "PCB-merging (pcb-merging.py PCB_merge)",
             {"pcb_ratio": 0.1, "clamp_min_ratio": 0.0001, "clamp_max_ratio": 0.0001, "lam": 1.0, "remove_keys": []},
             ["pcb-merging.py (PCB_merge)", "nlp_source_code/utils/merge_utils.py (state_dict_to_vector, vector_to_state_dict)"],
             pcb_run(base, tasks, lambda tv: PCB_merge(tv, pcb_ratio=0.1)[0], lam=1.0), pcb_note)
    add_case("pcb_nlp_r0p2_lam1p2", "svd", "PCB-merging (nlp task_para_att_merge, merge_function TPA_20_...)",
             {"att_ratio": 0.2, "clamp_min_ratio": 0.01, "clamp_max_ratio": 0.01, "lam": 1.2, "remove_keys": []},
             ["nlp_source_code/utils/merge_utils.py (task_para_att_merge)", "nlp_source_code/merging.py"],
             pcb_run(base, tasks, lambda tv: task_para_att_merge(tv, att_ratio=0.2)[0], lam=1.2), pcb_note)
    add_case("pcb_vision_r0p05_lams1p2", "svd", "PCB-merging (vision_source_code/pcb.py main)",
             {"att_ratio": 0.05, "clamp_min_ratio": 0.01, "clamp_max_ratio": 0.01, "lams": [1.2, 1.2, 1.2],
              "lam": 1.0, "remove_keys": []},
             ["vision_source_code/pcb.py"],
             pcb_run(base, tasks, lambda tv: pcb_vision_main(tv, att_ratio=0.05, lams=[1.2, 1.2, 1.2]), lam=1.0),
             pcb_note + " Variant: inter uses sign*minmax(|tv|) summed over tasks; per-task lams multiply the "
             "clamped task vectors inside the weighted average.")
    add_case("pcb_es_r0p05_lams", "svd", "PCB-merging (vision_source_code/pcb_ES.py PCB + compute_acc)",
             {"pcb_ratio": 0.05, "clamp_min_ratio": 0.01, "clamp_max_ratio": 0.01, "lams": [0.9, 1.1, 1.3],
              "lam": 1.0, "remove_keys": []},
             ["vision_source_code/pcb_ES.py"],
             pcb_run(base, tasks, lambda tv: pcb_es_merge(tv, pcb_ratio=0.05, lams=[0.9, 1.1, 1.3]), lam=1.0),
             pcb_note + " Variant: inter_i = sum_j tanh(nrm_i * nrm_j) with nrm = sign*minmax(|tv|).")

    # ---------------- RegMean ----------------
    g = torch.Generator().manual_seed(777)
    reg_params = OrderedDict([("layer.weight", (12, 8)), ("layer.bias", (12,)), ("wide.weight", (8, 20))])
    reg_modules = OrderedDict([("layer", 8), ("wide", 20)])
    reg_base = OrderedDict((k, torch.randn(s, generator=g, dtype=DTYPE)) for k, s in reg_params.items())
    reg_models, reg_grams = [], []
    for i in range(NUM_TASKS):
        m = OrderedDict((k, reg_base[k] + 0.1 * torch.randn(s, generator=g, dtype=DTYPE)) for k, s in reg_params.items())
        reg_models.append(m)
        grams = OrderedDict()
        for mod, din in reg_modules.items():
            # task-specific input scale so the grams differ in magnitude as well as direction
            x = (1.0 + 0.5 * i) * torch.randn(30, din, generator=g, dtype=DTYPE)
            tensors[f"input.regmean.x{i}.{mod}"] = x
            grams[mod] = regmean_gram_from_inputs(x)
        reg_grams.append(grams)
    for i in range(NUM_TASKS):
        for k, v in reg_models[i].items():
            tensors[f"input.regmean.model{i}.{k}"] = v
        for mod, v in reg_grams[i].items():
            tensors[f"input.regmean.gram{i}.{mod}"] = v
    meta["input_sets"]["regmean"] = {
        "seed": 777,
        "generation": "base=randn per param; model_k = base + 0.1*randn; x_k[module] = (1+0.5k)*randn(30, in); "
        "gram_k[module] = x^T x / 30 (FusionBench's hook stores the row-AVERAGED gram)",
        "params": {k: list(s) for k, s in reg_params.items()},
        "modules (Linear, in_features)": dict(reg_modules),
    }
    param_dict = defaultdict(list)
    for m in reg_models:
        for k, v in m.items():
            param_dict[k].append(v)
    reg_src = ["fusion_bench/method/regmean/regmean.py (reduce_non_diagonal_elements, merging_with_regmean_weights, "
               "RegMeanAlgorithm.run)", "fusion_bench/method/regmean/clip_regmean.py (gram hook)",
               "config/method/regmean/regmean.yaml", "config/method/regmean/clip_regmean.yaml"]
    for ratio, name in [(0.1, "regmean_r0p1"), (0.95, "regmean_r0p95"), (1.0, "regmean_r1p0")]:
        out = merging_with_regmean_weights(param_dict, reg_grams, reduce_non_diagonal_ratio=ratio, weight_transpose=True)
        add_case(name, "regmean", "RegMean (merging_with_regmean_weights)",
                 {"reduce_non_diagonal_ratio": ratio, "weight_transpose": True, "exclude_param_names_regex": []},
                 reg_src, out,
                 "merges the full fine-tuned weights (no base); '*.weight' of a Linear gets the RegMean solve, every "
                 "other param (bias) the plain mean. Defaults: regmean.yaml 0.1, clip_regmean.yaml 0.95, gpt2 0.6, "
                 "function default 1.0.")

    # ---------------- Fisher ----------------
    g = torch.Generator().manual_seed(4242)
    fi_params = OrderedDict([("layer.weight", (12, 8)), ("layer.bias", (8,)), ("wide.weight", (8, 20))])
    fi_base = OrderedDict((k, torch.randn(s, generator=g, dtype=DTYPE)) for k, s in fi_params.items())
    fi_models, fi_fishers = [], []
    for i in range(NUM_TASKS):
        m = OrderedDict((k, fi_base[k] + 0.1 * torch.randn(s, generator=g, dtype=DTYPE)) for k, s in fi_params.items())
        # positive, with a different overall scale per model so the global-norm normalisation matters
        f = OrderedDict((k, (3.0 ** i) * torch.randn(s, generator=g, dtype=DTYPE) ** 2 + 1e-3) for k, s in fi_params.items())
        fi_models.append(m)
        fi_fishers.append(f)
        for k in fi_params:
            tensors[f"input.fisher.model{i}.{k}"] = m[k]
            tensors[f"input.fisher.fisher{i}.{k}"] = f[k]
    meta["input_sets"]["fisher"] = {
        "seed": 4242,
        "generation": "base=randn per param; per model k: model_k = base + 0.1*randn, fisher_k = 3**k * randn**2 + 1e-3 "
        "(drawn interleaved: model then fisher, per param)",
        "params": {k: list(s) for k, s in fi_params.items()},
    }
    fparam_dict = defaultdict(list)
    for m in fi_models:
        for k, v in m.items():
            fparam_dict[k].append(v)
    fi_src = ["fusion_bench/method/fisher_merging/fisher_merging.py (get_models_fisher_norm, merging_with_fisher_weights, "
              "FisherMergingAlgorithm.run)", "config/method/fisher_merging/fisher_merging.yaml"]
    for norm, name in [(True, "fisher_default"), (False, "fisher_nonorm")]:
        out = merging_with_fisher_weights(
            fparam_dict, fi_fishers,
            fisher_scaling_coefficients=torch.ones(NUM_TASKS) / NUM_TASKS,  # as in FisherMergingAlgorithm.run (float32)
            normalize_fisher_weight=norm, minimal_fisher_weight=1e-6)
        add_case(name, "fisher", "Fisher merging (merging_with_fisher_weights)",
                 {"normalize_fisher_weight": norm, "minimal_fisher_weight": 1e-6,
                  "fisher_scaling_coefficients": "torch.ones(3)/3 (float32)", "exclude_param_names_regex": []},
                 fi_src, out)

    for k, v in tensors.items():
        assert torch.isfinite(v).all(), k
        tensors[k] = v.contiguous()
    st_path = os.path.join(HERE, "cases.safetensors")
    save_file(tensors, st_path, metadata={"fusionbench_commit": FB_SHA, "pcb_merging_commit": PCB_SHA})
    os.chmod(st_path, 0o644)
    with open(os.path.join(HERE, "cases.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=False)
        f.write("\n")
    print(f"wrote {len(tensors)} tensors, {os.path.getsize(st_path)} bytes; cases: {list(meta['cases'])}")


if __name__ == "__main__":
    main()
