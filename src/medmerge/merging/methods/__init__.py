"""The registry of merge methods. Adding a method: one module, one line below."""

from . import linear, model_stock, nuslerp, passthrough, slerp, task_arithmetic
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


def describe() -> list[tuple[str, str, str]]:
    """(name, base requirement, "param=default domain (scope), ...") of every method, by name (`medmerge methods`).

    The domain is what the plan accepts: `in (0, 1]`, `finite`, `in [0, 1] unless allow_extrapolation`,
    `one of l1|inverse_density`.
    """
    rows = []
    for name in sorted(REGISTRY):
        spec = REGISTRY[name].spec
        params = ", ".join(f"{p.name}{'' if p.required else '=' + str(p.default)}{p.domain_text()} ({p.scope})"
                           for p in spec.params)
        rows.append((name, spec.base, params))
    return rows


register(linear.METHOD)
register(slerp.METHOD)
register(nuslerp.METHOD)
register(model_stock.METHOD)
register(passthrough.METHOD)
for _method in task_arithmetic.METHODS:
    register(_method)

__all__ = ["REGISTRY", "MergeMethod", "MethodSpec", "Param", "TensorInputs", "describe", "get", "register"]
