"""`medmerge adapters merge` and `medmerge adapters extract`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..adapters import extract
from ..adapters.inputs import parse_adapter_arg
from ..adapters.merge import merge_adapters, summary
from .app import adapters_app
from .common import command, console, stdout


@command(adapters_app, "merge")
def adapters_merge_cmd(
    base: str = typer.Option(..., "--base", help="the base model folder the adapters were trained on"),
    adapter: list[str] = typer.Option(..., "--adapter", help="PATH:WEIGHT of a PEFT LoRA adapter (repeat); "
                                      "negative weights subtract; PATH alone is weight 1 (an existing path is always "
                                      "the path, even with a ':' in its name)"),
    out: Path = typer.Option(..., "--out", help="output folder (written atomically)"),
    method: str = typer.Option("exact", "--method", help="exact, cat, svd, ties, dare_linear, dare_ties, "
                               "magnitude_prune (all act on dW_i = s_i B_i A_i)"),
    as_: str = typer.Option("full", "--as", help="full: merged model weights; adapter: a PEFT adapter"),
    rank: Optional[int] = typer.Option(None, "--rank", help="rank of an SVD adapter export (default: sum of ranks)"),
    density: Optional[float] = typer.Option(None, "--density", help="fraction of each dW_i kept (ties, dare_*, "
                                            "magnitude_prune)"),
    seed: int = typer.Option(0, "--seed", help="seed of DARE's random drops (recorded)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="output dtype of a full export: float32, bfloat16 or "
                                        "float16 (default: the base's)"),
    shard_size: str = typer.Option("5GB", "--shard-size", help="largest output shard, e.g. 5GB"),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="a module missing from an adapter counts "
                                       "as dW = 0"),
    no_base_check: bool = typer.Option(False, "--no-base-check", help="skip the same-base check (fingerprint, "
                                       "else base config)"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="read pickle adapters/bases you trust"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="before the output is moved into place: read "
                                "back every tensor (CRC-32) and recompute a sample of modules"),
    verify_all: bool = typer.Option(False, "--verify-all", help="recompute every module instead of a sample "
                                    "(what `medmerge verify OUT` does)"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it exists"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Merge LoRA adapters exactly: W = W0 + sum_i w_i dW_i, as full weights or as an adapter."""
    record = merge_adapters(
        base, [parse_adapter_arg(a) for a in adapter], out, method=method, as_=as_, density=density, rank=rank,
        seed=seed, dtype=dtype, shard_size=shard_size, allow_missing=allow_missing, allow_pickle=allow_pickle,
        check_base=not no_base_check, verify="full" if verify_all else verify, force=force, progress=not quiet)
    console.print(summary(record, out))


@command(adapters_app, "extract")
def adapters_extract_cmd(
    base: str = typer.Argument(..., help="the base model folder"),
    tuned: str = typer.Argument(..., help="the fine-tuned model folder (same architecture and tensor shapes)"),
    out: Path = typer.Option(..., "--out", help="output adapter folder (written atomically)"),
    rank: str = typer.Option(..., "--rank", help="LoRA rank of every module (capped at its full rank min(out, in)), "
                             "or auto: the smallest rank per module that keeps --energy"),
    energy: Optional[float] = typer.Option(None, "--energy", help="with --rank auto: fraction (0, 1] of each "
                                           "module's squared Frobenius norm of W_tuned - W_base to keep"),
    max_rank: Optional[int] = typer.Option(None, "--max-rank", help="with --rank auto: the largest rank a module "
                                           "may take"),
    embed_lora: bool = typer.Option(False, "--embed-lora/--no-embed-lora", help="extract embeddings and the output "
                                    "head as LoRA too (default, as mergekit: saved whole in modules_to_save when "
                                    "changed)"),
    save_module: list[str] = typer.Option([], "--save-module", help="a module saved whole from TUNED "
                                          "(modules_to_save) instead of as LoRA: a full name or its last part, "
                                          "e.g. lm_head (repeat)"),
    skip_undecomposable: bool = typer.Option(False, "--skip-undecomposable", help="leave out changed tensors a "
                                             "LoRA cannot carry (norms, biases, embeddings) instead of saving their "
                                             "modules whole; they are reported"),
    dtype: str = typer.Option("float32", "--dtype", help="dtype of the saved factors: float32, bfloat16 or float16"),
    svd_dtype: str = typer.Option("float64", "--svd-dtype", help="precision of the SVD: float64, or float32 (faster, "
                                  "as mergekit)"),
    device: str = typer.Option("auto", "--device", help="where the SVDs run: auto, cpu, cuda or cuda:N"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="read pickle checkpoints you trust"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it exists"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Extract a PEFT LoRA adapter from TUNED - BASE by truncated SVD per module, with the energy kept."""
    record = extract.extract_lora(
        base, tuned, out, rank=rank, energy=energy, max_rank=max_rank, embed_lora=embed_lora,
        save_modules=save_module, skip_undecomposable=skip_undecomposable, dtype=dtype, svd_dtype=svd_dtype,
        device=device, allow_pickle=allow_pickle, force=force, progress=not quiet)
    table = Table(title=f"LoRA extracted from {record['tuned']['path']}")
    for col in ("module", "rank", "full rank", "energy kept"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for module, info in record["modules"].items():
        table.add_row(module, str(info["rank"]), str(info["full_rank"]), f"{info['energy_kept']:.4f}")
    stdout.print(table)
    console.print(extract.summary(record, out))
