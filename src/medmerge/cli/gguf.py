"""`medmerge import-gguf`."""

from __future__ import annotations

from pathlib import Path

import typer

from ..io.gguf import import_gguf
from .app import app
from .common import command, console


@command(app, "import-gguf")
def import_gguf_cmd(
    file: Path = typer.Argument(..., help="a llama.cpp .gguf model file (F32, F16, BF16, Q4_0 ... Q8_0, K-quants)"),
    out: Path = typer.Argument(..., help="output Hugging Face folder (written atomically)"),
    dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16, float16 or float32: the written weights' dtype"),
    shard_size: str = typer.Option("5GB", "--shard-size", help="largest output shard in BYTES, e.g. 5GB, 500MB"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it exists and is not empty"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="compare the written model's logits with the "
                                "GGUF model's before moving it into place"),
) -> None:
    """Dequantize a GGUF file into sharded safetensors, config, tokenizer (chat template) and generation config."""
    r = import_gguf(file, out, dtype=dtype, shard_size=shard_size, force=force, verify=verify)
    src, check = r["source"], r["verification"]
    types = ", ".join(f"{n} {k}" for k, n in src["quantization_types"].items())
    console.print(f"{src['architecture']} ({r['parameters'] / 1e6:.1f} M parameters; {types}) -> {r['out']} as "
                  f"{r['dtype']} in {r['seconds']} s")
    if check:
        console.print(f"verified on {check['prompts']} prompts: logits within {check['max_rel_logit_diff']:.2g} of "
                      f"their scale (tolerance {check['tolerance']}), top-1 agreement {check['top1_agreement']:.1%}")
