"""The registry of merge methods. Adding a method: one module, one line below."""

from . import (consensus, data_aware, linear, model_stock, nuslerp, passthrough, pcb, selective, slerp, spherical,
               subspace, task_arithmetic)
from .base import MergeMethod, MethodSpec, Param, TensorInputs

REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> None:
    if method.spec.name in REGISTRY:
        raise ValueError(f"merge method {method.spec.name!r} is already registered")
    REGISTRY[method.spec.name] = method


def get(name: str) -> MergeMethod:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown merge method {name!r}; available: {', '.join(sorted(REGISTRY))}"
        ) from None


def describe() -> list[tuple[str, str, str, str]]:
    """(name, base requirement, "param=default domain (scope), ...", memory) of every method, by name
    (`medmerge methods`).

    The domain is what the plan accepts: `in (0, 1]`, `finite`, `in [0, 1] unless allow_extrapolation`,
    `one of l1|inverse_density`.
    """
    rows = []
    for name in sorted(REGISTRY):
        spec = REGISTRY[name].spec
        params = ", ".join(f"{p.name}{'' if p.required else '=' + str(p.default)}{p.domain_text()} ({p.scope})"
                           for p in spec.params)
        rows.append((name, spec.base, params, spec.memory))
    return rows


_SCOPES = {"global": "global", "input": "per model", "non_base": "per model (not the base)"}
_BASES = {"required": "required", "optional": "optional", "ignored": "not used (treated as one more input if given)"}


def markdown() -> str:
    """The "## Methods" section of docs/methods.md, from the specs (a test keeps the file equal to it)."""
    out = ["## Methods", ""]
    for name in sorted(REGISTRY):
        spec = REGISTRY[name].spec
        inputs = f"{spec.min_inputs}+" if spec.max_inputs is None else f"{spec.min_inputs}-{spec.max_inputs}"
        line = f"Base model: {_BASES[spec.base]}. Inputs: {inputs} inputs"
        if spec.min_non_base or spec.max_non_base is not None:
            line += f"; {spec.min_non_base}-{spec.max_non_base if spec.max_non_base is not None else ''} besides the base"
        line += "." + (f" Reference: {spec.reference}" if spec.reference else "") + f" Memory: {spec.memory}."
        out += [f"### `{name}`", "", line, ""]
        if spec.formula:
            out += [f"    {spec.formula}", ""]
        if spec.params:
            out += ["| parameter | scope | type | default | domain | meaning |", "|---|---|---|---|---|---|"]
            for prm in spec.params:
                default = "required" if prm.required else f"`{prm.default}`"
                domain = prm.domain_text().strip().replace("|", " / ") or "-"
                out.append(f"| `{prm.name}` | {_SCOPES[prm.scope]} | {prm.type.__name__} | {default} | {domain} | "
                           f"{prm.doc} |")
            out.append("")
    return "\n".join(out)


register(linear.METHOD)
register(slerp.METHOD)
register(nuslerp.METHOD)
register(model_stock.METHOD)
register(passthrough.METHOD)
for _method in task_arithmetic.METHODS:
    register(_method)
for _method in (spherical.MULTISLERP, spherical.KARCHER, consensus.SCE, consensus.RAM, consensus.RAMPLUS_TL,
                selective.NEARSWAP, selective.ARCEE_FUSION, data_aware.REGMEAN, data_aware.FISHER,
                subspace.TSV_M, subspace.ISO_C, subspace.ISO_CTS, pcb.PCB):
    register(_method)

__all__ = ["REGISTRY", "MergeMethod", "MethodSpec", "Param", "TensorInputs", "describe", "get", "markdown", "register"]
