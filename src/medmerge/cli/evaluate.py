"""`medmerge eval`, `medmerge compare`, `medmerge tasks`, `medmerge setup-nltk`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import MedmergeError
from ..evaluation import nltk_data
from ..evaluation.compare import compare, parse_references, render_markdown
from ..evaluation.registry import builtin_tasks, task_table
from ..evaluation.runner import check_limit, evaluate
from .app import app
from .common import command, console, stdout


@command(app, "eval")
def eval_cmd(
    model: str = typer.Argument(..., help="local model folder (Hugging Face format)"),
    tasks: str = typer.Option("", "--tasks", help="comma-separated: mm_* tasks (`medmerge tasks`) or lm-eval built-ins"),
    out: Path = typer.Option(..., "--out", help="output folder for results.json (written atomically)"),
    task_file: list[Path] = typer.Option([], "--task-file", help="generic clinical-generation task SPEC.yaml (repeatable)"),
    include_path: list[Path] = typer.Option([], "--include-path", help="extra folder of lm-eval task YAMLs (repeatable)"),
    peft: Optional[Path] = typer.Option(None, "--peft", help="PEFT adapter folder to apply to MODEL"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", envvar="MEDMERGE_DATA", help="folder with the task data (or MEDMERGE_DATA)"),
    limit: Optional[float] = typer.Option(None, "--limit", help="first N documents per task (or a fraction < 1)"),
    batch_size: str = typer.Option("1", "--batch-size", help="batch size, or auto"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16"),
    seed: int = typer.Option(1234, "--seed", help="seed for python, numpy, torch and few-shot sampling"),
    gen_kwargs: Optional[str] = typer.Option(None, "--gen-kwargs", help="e.g. temperature=0.7,top_p=0.9,do_sample=true,max_new_tokens=64"),
    chat_template: str = typer.Option("auto", "--chat-template", help="auto (apply the model's template if it has one) or none"),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="system message for chat-templated prompts"),
    log_samples: bool = typer.Option(False, "--log-samples", help="write OUT/samples/<task>.jsonl"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it exists and is not empty"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="load .bin pickle weights (only if you trust them)"),
    no_base_check: bool = typer.Option(False, "--no-base-check", help="skip the check that --peft was trained on MODEL "
                                       "(recorded fingerprint, else the adapter's base_model_name_or_path)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show lm-eval's log"),
    engine: str = typer.Option("hf", "--engine", help="lm-eval backend: hf (transformers) or vllm (a CUDA GPU; "
                               "pip install 'medmerge[vllm]')"),
    tensor_parallel: Optional[int] = typer.Option(None, "--tensor-parallel", help="vllm: GPUs per engine"),
    data_parallel: Optional[int] = typer.Option(None, "--data-parallel", help="vllm: engines (through Ray)"),
    gpu_memory_utilization: Optional[float] = typer.Option(None, "--gpu-memory-utilization",
                                                           help="vllm: share of each GPU's memory (0-1]"),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", help="vllm: context length"),
) -> None:
    """Evaluate MODEL (optionally with --peft) on --tasks, offline; write OUT/results.json.

    Under `accelerate launch --multi_gpu --num_processes N` (or torchrun) the documents are shared across
    the N processes (GPUs, or CPU processes over gloo) and rank 0 writes OUT.
    """
    given = {k: v for k, v in dict(tensor_parallel=tensor_parallel, data_parallel=data_parallel,
                                   gpu_memory_utilization=gpu_memory_utilization,
                                   max_model_len=max_model_len).items() if v is not None}
    if given and engine != "vllm":
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise MedmergeError(f"{flags}: vLLM options, for --engine vllm (the engine is {engine})")
    results = evaluate(
        model, [t for t in tasks.split(",") if t.strip()], out, peft=peft, task_files=task_file,
        include_paths=include_path, data_dir=data_dir,
        limit=check_limit(limit),  # a count, or a fraction below 1; finite and above 0
        batch_size=int(batch_size) if batch_size.isdigit() else batch_size,
        device=device, dtype=dtype, seed=seed, gen_kwargs=gen_kwargs, chat_template=chat_template,
        system_prompt=system_prompt, log_samples=log_samples, force=force, allow_pickle=allow_pickle,
        verbose=verbose, base_check=not no_base_check, engine=engine, vllm=given if engine == "vllm" else None,
    )
    if "tasks" not in results:  # not rank 0 of `accelerate launch`: rank 0 gathered this process's documents
        return
    table = Table(title=f"{model}{' + ' + str(peft) if peft else ''}")
    for col in ("task", "metric", "value", "stderr"):
        table.add_column(col)
    for task, row in results["tasks"].items():
        for metric, value in row.items():
            err = results["stderr"].get(task, {}).get(metric)
            table.add_row(task, metric, "-" if value is None else f"{value:.4g}", "" if err is None else f"{err:.3g}")
    for task, row in results["unavailable"].items():
        for metric, reason in row.items():
            table.add_row(task, metric, "[yellow]unavailable[/]", "")
            console.print(f"[yellow]{task} {metric} unavailable:[/] {reason}")
    stdout.print(table)
    console.print(f"wrote {out / 'results.json'} ({results['wall_time_s']:.1f}s)")


@command(app, "compare")
def compare_cmd(
    results: list[Path] = typer.Argument(..., help="results.json files or eval output folders"),
    reference: list[str] = typer.Option([], "--reference", help="NAME=RESULTS for the parents: instruct=DIR and clinical=DIR"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for comparison.md, comparison.json and tradeoff.png"),
    if_metric: Optional[str] = typer.Option(None, "--if-metric", help="instruction-following score: TASK/METRIC (mean: the task's metrics' mean; default mm_ifeval/mean)"),
    clinical_metric: list[str] = typer.Option([], "--clinical-metric", help="clinical score part TASK/METRIC (repeatable; default: every task's composite or acc)"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it exists"),
    base: Optional[Path] = typer.Option(None, "--base", help="the models' common parent folder: adds each model's "
                                        "task vector (relative delta norms, cosines between the deltas)"),
    replicates: int = typer.Option(2000, "--replicates", help="bootstrap replicates of the intervals (100-100000)"),
    seed: int = typer.Option(0, "--seed", help="seed of the bootstrap"),
) -> None:
    """Table of scores, deltas to each reference, instruction-following retention and clinical gain kept.

    Results written with per-document values (`medmerge eval --log-samples`) get 95% paired bootstrap
    intervals of the retention and the gain kept."""
    report = compare(results, parse_references(reference), out=out, if_metric=if_metric,
                     clinical_metrics=clinical_metric, force=force, base=base, replicates=replicates, seed=seed)
    typer.echo(render_markdown(report))
    if out:
        console.print(f"wrote {out}/comparison.md, comparison.json and tradeoff.png")


@command(app, "tasks")
def tasks_cmd(
    all_tasks: bool = typer.Option(False, "--all", help="also list lm-eval's built-in tasks (they read the hub)"),
    include_path: list[Path] = typer.Option([], "--include-path", help="extra folder of lm-eval task YAMLs (repeatable)"),
) -> None:
    """List the shipped evaluation tasks (and those of --include-path folders)."""
    table = Table(title="evaluation tasks (data paths relative to --data-dir / MEDMERGE_DATA)")
    for col in ("task", "kind", "expects", "defined in"):
        table.add_column(col)
    for row in task_table(include_path):
        table.add_row(*row)
    stdout.print(table)
    if all_tasks:
        stdout.print(", ".join(builtin_tasks()))


@command(app, "setup-nltk")
def setup_nltk_cmd(
    wordnet_dir: Optional[Path] = typer.Option(None, "--wordnet-dir", help="a folder with WordNet 3.0's dict files (data.noun, ...)"),
) -> None:
    """Install NLTK's punkt_tab (IFEval) and WordNet (METEOR) offline into the project's NLTK folder."""
    report = nltk_data.setup(wordnet_source=wordnet_dir)
    console.print(f"NLTK data in {report['nltk_data']}: punkt_tab {'ok' if report['punkt_tab'] else 'MISSING'}")
    if report["wordnet"]:
        console.print("WordNet 3.0: ok")
    else:
        console.print(f"[yellow]WordNet unavailable:[/] {report['wordnet_reason']}")
