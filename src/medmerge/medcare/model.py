"""The MedCare model wrapper: put MedCare layers into a transformers model, move between stages, save, fold.

Stage 1: attention projections get LoRA; FFN projections get the knowledge
aggregator (KA) and the routed noise experts. Between stages the attention LoRA is
merged into W0 and the router and noise experts are dropped. Stage 2: FFN
projections get the alignment module (AM) next to the KA. A run folder stores only
the adapter tensors (`medcare_model.safetensors`) and `medcare_config.json`; the
base model is referenced by path and content fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import InputError
from .config import AlignmentSettings, ModuleSettings
from .layer import MedCareLinear

SCHEMA = "medmerge.medcare/1"
CONFIG_FILE = "medcare_config.json"
WEIGHTS_FILE = "medcare_model.safetensors"


def generator(seed: int, part: str) -> torch.Generator:
    """A torch generator for one named part of the initialisation, derived from the recorded seed."""
    digest = hashlib.sha256(f"medcare-{part}-{seed}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def check_architecture(model: nn.Module, spec: ModuleSettings, where: str) -> dict[str, list[str]]:
    """{"attention": [...], "ffn": [...]}: the module paths to adapt, or an InputError naming what the model has.

    Every transformer block must hold every target projection as an nn.Linear (Llama, Qwen2, Mistral style).
    """
    linear = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    found = {}
    for group, targets in (("attention", spec.attention.target_modules), ("ffn", spec.ffn.target_modules)):
        found[group] = sorted((n for n in linear if _leaf(n) in targets), key=_natural)
        missing = [t for t in targets if not any(_leaf(n) == t for n in linear)]
        if missing:
            kinds: dict[str, str] = {}
            for n, m in model.named_modules():
                if n and not list(m.children()) and any(True for _ in m.parameters(recurse=False)):
                    kinds.setdefault(_leaf(n), type(m).__name__)
            names = ", ".join(f"{k} ({v})" for k, v in sorted(kinds.items()))
            not_linear = [f"{t} is a {kinds[t]}" for t in missing if t in kinds]
            raise InputError(
                f"{where}: MedCare needs {group} projections {', '.join(targets)} as linear layers (Llama/Qwen "
                f"style); {', '.join(missing)} not found" + (f" ({'; '.join(not_linear)}, not nn.Linear)"
                                                             if not_linear else "")
                + f". The model's modules with weights: {names}. For another "
                f"architecture, name its projections in modules.attention.target_modules / "
                f"modules.ffn.target_modules")
    counts = {t: sum(_leaf(n) == t for n in found["attention"] + found["ffn"])
              for t in spec.attention.target_modules + spec.ffn.target_modules}
    if len(set(counts.values())) > 1:
        raise InputError(f"{where}: the target projections occur unevenly across blocks ({counts}); MedCare adapts "
                         "the same projections in every block")
    return found


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


class MedCareModel:
    """A transformers causal LM with MedCare layers in place, and what is needed to move it between stages."""

    def __init__(self, model: nn.Module, spec: ModuleSettings, stage: int, seed: int,
                 alignment: Optional[AlignmentSettings] = None):
        self.model = model
        self.spec = spec
        self.stage = stage
        self.seed = seed
        self.alignment = alignment
        self.attention_factors: dict[str, torch.Tensor] = {}  # merged attention LoRA, kept for export

    # --- building --------------------------------------------------------------------------------------

    @classmethod
    def stage1(cls, model: nn.Module, spec: ModuleSettings, seed: int, where: str = "model") -> "MedCareModel":
        """Attention LoRA + FFN knowledge aggregator and noise experts on a frozen `model`."""
        targets = check_architecture(model, spec, where)
        for p in model.parameters():
            p.requires_grad_(False)
        att, ffn = spec.attention, spec.ffn
        g_att, g_ka, g_noise = generator(seed, "attention"), generator(seed, "knowledge"), generator(seed, "noise")
        for name in targets["attention"]:
            _replace(model, name, MedCareLinear(model.get_submodule(name), shared="lora", rank=att.r,
                                                scaling=att.scaling, dropout=att.dropout, generator=g_att))
        for name in targets["ffn"]:
            layer = MedCareLinear(model.get_submodule(name), shared="ka", rank=ffn.knowledge_rank,
                                  scaling=ffn.scaling, dropout=ffn.dropout, generator=g_ka)
            layer.add_noise_experts(ffn.noise_experts, ffn.noise_rank, ffn.top_k, g_noise)
            _replace(model, name, layer)
        return cls(model, spec, 1, seed)

    def to_stage2(self, alignment: AlignmentSettings, seed: int) -> "MedCareModel":
        """Merge the attention LoRA into W0, drop the router and noise experts (unless kept), add the AM."""
        self.merge_attention()
        if not alignment.keep_noise:
            for layer in self.ffn_layers().values():
                layer.drop_noise_experts()
        g_am = generator(seed, "alignment")
        for layer in self.ffn_layers().values():
            layer.add_alignment_module(alignment.rank, g_am)
        self.stage, self.seed, self.alignment = 2, seed, alignment
        return self

    def merge_attention(self) -> None:
        """W0 <- W0 + s B A for every attention layer, which becomes a plain nn.Linear (frozen) again."""
        for name, layer in self.attention_layers().items():
            with torch.no_grad():
                merged = (layer.weight.float() + layer.scaling * (layer.B @ layer.A)).to(layer.weight.dtype)
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            plain.weight = nn.Parameter(merged, requires_grad=False)
            plain.bias = layer.bias
            self.attention_factors[f"{name}.lora_A"] = layer.A.detach().clone()
            self.attention_factors[f"{name}.lora_B"] = layer.B.detach().clone()
            _replace(self.model, name, plain)

    # --- views -----------------------------------------------------------------------------------------

    def layers(self) -> dict[str, MedCareLinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, MedCareLinear)}

    def attention_layers(self) -> dict[str, MedCareLinear]:
        return {n: m for n, m in self.layers().items() if m.shared == "lora"}

    def ffn_layers(self) -> dict[str, MedCareLinear]:
        return {n: m for n, m in self.layers().items() if m.shared == "ka"}

    def has_noise(self) -> bool:
        return any(m.router is not None for m in self.layers().values())

    def trainable(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)

    # --- saving and loading ----------------------------------------------------------------------------

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Every MedCare tensor (not W0): `<module>.<lora|ka|am|noise>_<A|B>`, `<module>.router.<weight|bias>`."""
        out = dict(self.attention_factors)
        for name, layer in self.layers().items():
            for pname, p in layer.named_parameters():
                if pname not in ("weight", "bias"):
                    out[f"{name}.{pname}"] = p.detach()
        return {k: v.contiguous() for k, v in sorted(out.items(), key=lambda kv: _natural(kv[0]))}

    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Copy saved MedCare tensors in; every expected name must be there with its shape (and no others)."""
        own = self.adapter_state_dict()
        missing = sorted(set(own) - set(tensors))
        extra = sorted(set(tensors) - set(own))
        if missing or extra:
            raise InputError(f"{where} does not match this MedCare model: missing {missing[:5]}, unexpected "
                             f"{extra[:5]}; was it written for another base model or module settings?")
        params = dict(self.model.named_parameters())
        for name, value in tensors.items():
            if tuple(value.shape) != tuple(own[name].shape):
                raise InputError(f"{where}: tensor {name} has shape {tuple(value.shape)}, the model expects "
                                 f"{tuple(own[name].shape)}")
            with torch.no_grad():
                if name in self.attention_factors:
                    self.attention_factors[name] = value.clone()
                else:
                    params[name].copy_(value)

    def describe(self) -> dict:
        """What medcare_config.json records about the modules."""
        counts = {"attention_layers": len(self.attention_layers()) or len(self.attention_factors) // 2,
                  "ffn_layers": len(self.ffn_layers()),
                  "trainable_parameters": sum(p.numel() for _, p in self.trainable())}
        return {"schema": SCHEMA, "stage": self.stage, "seed": self.seed,
                "modules": self.spec.model_dump(mode="json"),
                "alignment": self.alignment.model_dump(mode="json", by_alias=True) if self.alignment else None,
                "attention_merged": bool(self.attention_factors), "noise_experts": self.has_noise(), **counts}

    def save(self, folder: Path, extra: Optional[dict] = None) -> None:
        folder = Path(folder)
        save_file({k: v.cpu() for k, v in self.adapter_state_dict().items()}, str(folder / WEIGHTS_FILE),
                  metadata={"format": "pt", "medmerge": SCHEMA})
        (folder / CONFIG_FILE).write_text(json.dumps({**self.describe(), **(extra or {})}, indent=2) + "\n")


def read_run(run: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(medcare_config.json, the adapter tensors) of a stage-1 or stage-2 run folder, or a clear error."""
    run = Path(run)
    cfg_file, weights = run / CONFIG_FILE, run / WEIGHTS_FILE
    if not cfg_file.is_file() or not weights.is_file():
        raise InputError(f"{run} is not a MedCare run folder (needs {CONFIG_FILE} and {WEIGHTS_FILE}); give the "
                         "--out folder of `medmerge medcare stage1` or `stage2`")
    info = json.loads(cfg_file.read_text())
    if info.get("schema") != SCHEMA:
        raise InputError(f"{cfg_file}: schema {info.get('schema')!r}, expected {SCHEMA}")
    return info, load_file(str(weights))


def build_from_run(model: nn.Module, info: dict, tensors: dict[str, torch.Tensor], where: str) -> MedCareModel:
    """Rebuild a saved run's MedCare model on a freshly loaded base `model` (weights from `tensors`)."""
    spec = ModuleSettings(**info["modules"])
    mc = MedCareModel.stage1(model, spec, info["seed"], where=where)
    if info["stage"] == 2:
        alignment = AlignmentSettings(**info["alignment"])
        # the stage-1 factors are loaded first so that merging them reproduces stage 2's attention weights
        att = {k: v for k, v in tensors.items() if k.endswith((".lora_A", ".lora_B"))}
        for name, layer in mc.attention_layers().items():
            with torch.no_grad():
                layer.A.copy_(att[f"{name}.lora_A"])
                layer.B.copy_(att[f"{name}.lora_B"])
        mc.to_stage2(alignment, info["seed"])
    mc.load_adapter_state_dict(tensors, where)
    return mc
