"""The `medmerge` command line: each command is one library call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import MedmergeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Merge and verify clinical LLMs in weight space.")
console = Console(stderr=True)


def _fail(e: Exception) -> None:
    console.print(f"[bold red]error:[/] {e}")
    raise typer.Exit(2)


@app.command("merge")
def merge_cmd(
    config: Path = typer.Argument(..., help="mergekit-style YAML (merge_method, models, base_model, parameters, ...)"),
    out: Path = typer.Argument(..., help="output folder (written atomically)"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it exists and is not empty"),
    shard_size: str = typer.Option("5GB", "--shard-size", help="largest output shard in BYTES, e.g. 5GB, 500MB, 2GiB"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto"),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for the kernels (default: torch's)"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="read .bin/.pt pickle checkpoints (only if you trust them)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="let tokenizers run code from the model folders"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="recompute a sample of tensors after merging"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Merge the models of CONFIG into OUT."""
    from .merge import merge

    if device not in ("cpu", "cuda", "auto"):
        _fail(MedmergeError(f"--device must be cpu, cuda or auto, not {device!r}"))
    try:
        result = merge(
            config, out, force=force, shard_size=shard_size, device=device, threads=threads,
            allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, verify=verify, progress=not quiet,
        )
    except MedmergeError as e:
        _fail(e)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted:[/] nothing was written")
        raise typer.Exit(130)
    s = result.stats
    console.print(
        f"merged {s.tensors} tensors with [bold]{result.plan.method.spec.name}[/] into {out} "
        f"({s.bytes_written / 1e6:.1f} MB in {s.seconds:.2f}s)"
    )
    if result.verification is not None:
        worst = max((c.max_abs for c in result.verification.checked), default=0.0)
        console.print(f"verified {len(result.verification.checked)} recomputed tensors: largest abs error {worst:.3g}")
    for note in result.notes:
        console.print(f"note: {note}")


@app.command("verify")
def verify_cmd(
    folder: Path = typer.Argument(..., help="a folder written by `medmerge merge`"),
    sample: Optional[float] = typer.Option(None, "--sample", help="recompute only this FRACTION of tensors (0-1)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the report as JSON here"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="inputs are pickle checkpoints you trust"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    base: Optional[str] = typer.Option(None, "--base", help="adapter merges: the base model the export should hold"),
    adapter: Optional[list[str]] = typer.Option(None, "--adapter", help="adapter merges: PATH:WEIGHT of each "
                                                "adapter the export should hold (repeat); for exports of any tool"),
    method: Optional[str] = typer.Option(None, "--method", help="adapter merges: the intended method (default exact)"),
    density: Optional[float] = typer.Option(None, "--density", help="adapter merges: density of the intended method"),
    seed: Optional[int] = typer.Option(None, "--seed", help="adapter merges: seed of the intended method"),
) -> None:
    """Recompute FOLDER from its inputs; exit 1 on any mismatch.

    A `medmerge merge` output is recomputed from its medmerge.yml. An adapter
    merge (written by `medmerge adapters merge`, or by any tool when --base and
    --adapter say what it should be) is checked module by module against
    W0 + sum w_i dW_i, and an export that equals the base or one adapter alone is
    named as such.
    """
    from .adapters.merge import RECORD_KEY, parse_adapter_arg
    from .adapters.verify import verify_adapter_merge
    from .verify import verify

    if sample is not None and not 0 < sample <= 1:
        _fail(MedmergeError("--sample is a fraction in (0, 1]"))
    try:
        record_file = folder / "medmerge.yml"
        is_adapter_merge = bool(adapter) or (record_file.is_file() and RECORD_KEY in record_file.read_text())
        if is_adapter_merge:
            adapters = [parse_adapter_arg(a) for a in adapter] if adapter else None
            report = verify_adapter_merge(folder, base=base, adapters=adapters, method=method, density=density,
                                          seed=seed, allow_pickle=allow_pickle, progress=not quiet)
        else:
            report = verify(folder, sample=sample, allow_pickle=allow_pickle, progress=not quiet)
    except MedmergeError as e:
        _fail(e)
    if json_out:
        json_out.write_text(json.dumps(report.to_dict(), indent=2))
    table = Table(title=f"{folder}: {len(report.checked)} of {report.total_tensors} tensors recomputed")
    for col in ("tensor", "max abs error", "max rel error", "ok"):
        table.add_column(col)
    for c in sorted(report.checked, key=lambda c: -c.max_abs)[:10]:
        table.add_row(c.name, f"{c.max_abs:.3g}", f"{c.max_rel:.3g}", "yes" if c.ok else "[red]NO[/]")
    Console().print(table)
    for p in report.problems + list(getattr(report, "pitfalls", [])):
        console.print(f"[red]problem:[/] {p}")
    for n in report.notes:
        console.print(f"note: {n}")
    Console().print("[bold green]OK[/]" if report.ok else "[bold red]MISMATCH[/]")
    raise typer.Exit(0 if report.ok else 1)


@app.command("methods")
def methods_cmd() -> None:
    """List merge methods, their parameters and defaults."""
    from . import methods

    for name in sorted(methods.REGISTRY):
        spec = methods.REGISTRY[name].spec
        params = ", ".join(
            f"{p.name}{'' if p.required else '=' + str(p.default)} ({p.scope})" for p in spec.params
        )
        Console().print(f"[bold]{name}[/] base={spec.base}: {params}")


@app.command("eval")
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
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show lm-eval's log"),
) -> None:
    """Evaluate MODEL (optionally with --peft) on --tasks, offline; write OUT/results.json."""
    from .evaluation.runner import evaluate

    if limit is not None and limit <= 0:
        _fail(MedmergeError("--limit must be positive"))
    lim = None if limit is None else (int(limit) if limit >= 1 else limit)
    try:
        results = evaluate(
            model, [t for t in tasks.split(",") if t.strip()], out, peft=peft, task_files=task_file,
            include_paths=include_path,
            data_dir=data_dir, limit=lim, batch_size=int(batch_size) if batch_size.isdigit() else batch_size,
            device=device, dtype=dtype, seed=seed, gen_kwargs=gen_kwargs, chat_template=chat_template,
            system_prompt=system_prompt, log_samples=log_samples, force=force, allow_pickle=allow_pickle,
            verbose=verbose,
        )
    except MedmergeError as e:
        _fail(e)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted:[/] nothing was written")
        raise typer.Exit(130)
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
    Console().print(table)
    console.print(f"wrote {out / 'results.json'} ({results['wall_time_s']:.1f}s)")


@app.command("compare")
def compare_cmd(
    results: list[Path] = typer.Argument(..., help="results.json files or eval output folders"),
    reference: list[str] = typer.Option([], "--reference", help="NAME=RESULTS for the parents: instruct=DIR and clinical=DIR"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for comparison.md, comparison.json and tradeoff.png"),
    if_metric: str = typer.Option("mm_ifeval/mean", "--if-metric", help="instruction-following score: TASK/METRIC (mean: the task's metrics' mean)"),
    clinical_metric: list[str] = typer.Option([], "--clinical-metric", help="clinical score part TASK/METRIC (repeatable; default: every task's composite or acc)"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it exists"),
) -> None:
    """Table of scores, deltas to each reference, instruction-following retention and clinical gain kept."""
    from .evaluation.compare import compare, render_markdown

    try:
        refs = {}
        for item in reference:
            if "=" not in item:
                raise MedmergeError(f"--reference {item!r}: use NAME=RESULTS, e.g. instruct=runs/eval/instruct")
            name, path = item.split("=", 1)
            refs[name.strip()] = Path(path)
        report = compare(results, refs, out=out, if_metric=if_metric, clinical_metrics=clinical_metric, force=force)
    except MedmergeError as e:
        _fail(e)
    typer.echo(render_markdown(report))
    if out:
        console.print(f"wrote {out}/comparison.md, comparison.json and tradeoff.png")


@app.command("tasks")
def tasks_cmd(
    all_tasks: bool = typer.Option(False, "--all", help="also list lm-eval's built-in tasks (they read the hub)"),
    include_path: list[Path] = typer.Option([], "--include-path", help="extra folder of lm-eval task YAMLs (repeatable)"),
) -> None:
    """List the shipped evaluation tasks (and those of --include-path folders)."""
    from .evaluation.runner import group_members, shipped_tasks

    from .evaluation.data import SOURCES

    expects = {}
    for src in SOURCES.values():
        expects.setdefault(src.task, []).append(" or ".join(src.candidates))
    table = Table(title="evaluation tasks (data paths relative to --data-dir / MEDMERGE_DATA)")
    for col in ("task", "kind", "expects", "defined in"):
        table.add_column(col)
    for name, path in shipped_tasks(include_path).items():
        members = group_members(name, include_path)
        kind = f"group of {len(members)}" if members != [name] else ""
        want = expects.get(name) or (["mmlu/test/<subject>_test.csv"] if name.startswith("mm_mmlu_") else [])
        table.add_row(name, kind, "; ".join(want), path.name)
    Console().print(table)
    if all_tasks:
        from lm_eval.tasks import TaskManager

        Console().print(", ".join(TaskManager().all_tasks))


@app.command("setup-nltk")
def setup_nltk_cmd(
    wordnet_dir: Optional[Path] = typer.Option(None, "--wordnet-dir", help="a folder with WordNet 3.0's dict files (data.noun, ...)"),
) -> None:
    """Install NLTK's punkt_tab (IFEval) and WordNet (METEOR) offline into the project's NLTK folder."""
    from .evaluation import nltk_data

    report = nltk_data.setup(wordnet_source=wordnet_dir)
    console.print(f"NLTK data in {report['nltk_data']}: punkt_tab {'ok' if report['punkt_tab'] else 'MISSING'}")
    if report["wordnet"]:
        console.print("WordNet 3.0: ok")
    else:
        console.print(f"[yellow]WordNet unavailable:[/] {report['wordnet_reason']}")


@app.command("train", context_settings={"allow_extra_args": False})
def train_cmd(
    config: Path = typer.Argument(..., help="training YAML (stage, model, data, lora, training, ...)"),
    overrides: list[str] = typer.Argument(None, help="KEY=VALUE overrides, e.g. training.lr=1e-3 lora.r=8 k_shot=64"),
    out: Path = typer.Option(..., "--out", help="output folder for the model or adapter (written atomically)"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it exists"),
    resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint in OUT.medmerge-work/"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Train one stage: pt (continued pre-training) or sft (instruction tuning), full or LoRA."""
    from .training.config import load_config
    from .training.trainer import train

    try:
        cfg = load_config(config, overrides or [])
        result = train(cfg, out, force=force, resume=resume, progress=not quiet)
    except MedmergeError as e:
        _fail(e)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted:[/] nothing was written; checkpoints are kept for --resume")
        raise typer.Exit(130)
    console.print(f"trained {result.steps} steps in {result.seconds:.1f}s (final loss {result.train_loss:.4f}, "
                  f"{result.tokens_per_second:.0f} tokens/s) -> {out}")


miniclinic_app = typer.Typer(no_args_is_help=True, help="The embedded synthetic clinical world.")
app.add_typer(miniclinic_app, name="miniclinic")


@miniclinic_app.command("build")
def miniclinic_build_cmd(
    out: Path = typer.Argument(..., help="output folder: data/, models/<name>/, eval/, summary.json"),
    preset: str = typer.Option("quick", "--preset", help="quick (<= 3 min on 2 cores) or full (<= 12 min)"),
    seed: int = typer.Option(0, "--seed", help="seed for the world's data, model init and training"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it exists"),
    no_cache: bool = typer.Option(False, "--no-cache", help="rebuild even if a cached build exists"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Generate the synthetic world and train base, instruct, clinical and instruct_ft on it."""
    from .miniclinic.build import build, render_table

    try:
        summary = build(out, preset=preset, seed=seed, force=force, progress=not quiet, use_cache=not no_cache)
    except MedmergeError as e:
        _fail(e)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted:[/] nothing was written")
        raise typer.Exit(130)
    typer.echo(render_table(summary))
    where = f" (from cache {summary['from_cache']})" if summary.get("from_cache") else ""
    console.print(f"built {out} with preset {preset}, seed {seed} in {summary['timings_s']['total']:.0f}s{where}")


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="the demo's run folder (world, sweep, fewshot, report)"),
    preset: str = typer.Option("quick", "--preset", help="quick (<= 4 min on 2 cores) or full (<= 15 min)"),
    seed: int = typer.Option(0, "--seed", help="seed of the world, the merges and the fine-tuning"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """The whole experiment on the synthetic clinical world: forgetting, merge sweep, few-shot, report."""
    from .demo import run_demo

    try:
        run_demo(out, preset=preset, seed=seed, progress=not quiet)
    except MedmergeError as e:
        _fail(e)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted:[/] finished steps are kept in OUT; run again to continue")
        raise typer.Exit(130)


adapters_app = typer.Typer(no_args_is_help=True, help="LoRA adapters: exact weighted merges.")
app.add_typer(adapters_app, name="adapters")


@adapters_app.command("merge")
def adapters_merge_cmd(
    base: str = typer.Option(..., "--base", help="the base model folder the adapters were trained on"),
    adapter: list[str] = typer.Option(..., "--adapter", help="PATH:WEIGHT of a PEFT LoRA adapter (repeat); "
                                      "negative weights subtract"),
    out: Path = typer.Option(..., "--out", help="output folder (written atomically)"),
    method: str = typer.Option("exact", "--method", help="exact, cat, svd, ties, dare_linear, dare_ties, "
                               "magnitude_prune (all act on dW_i = s_i B_i A_i)"),
    as_: str = typer.Option("full", "--as", help="full: merged model weights; adapter: a PEFT adapter"),
    rank: Optional[int] = typer.Option(None, "--rank", help="rank of an SVD adapter export (default: sum of ranks)"),
    density: Optional[float] = typer.Option(None, "--density", help="fraction of each dW_i kept (ties, dare_*, "
                                            "magnitude_prune)"),
    seed: int = typer.Option(0, "--seed", help="seed of DARE's random drops (recorded)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="output dtype of a full export (default: the base's)"),
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
    from .adapters.merge import merge_adapters, parse_adapter_arg

    try:
        record = merge_adapters(
            base, [parse_adapter_arg(a) for a in adapter], out, method=method, as_=as_, density=density, rank=rank,
            seed=seed, dtype=dtype, shard_size=shard_size, allow_missing=allow_missing, allow_pickle=allow_pickle,
            check_base=not no_base_check, verify="full" if verify_all else verify, force=force, progress=not quiet)
    except MedmergeError as e:
        _fail(e)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted:[/] nothing was written")
        raise typer.Exit(130)
    info = record["adapter_merge"]
    stats = record.get("stats", {})
    parts = ", ".join(f"{a['weight']:g} x {a['path']}" for a in info["adapters"])
    console.print(f"merged {stats.get('modules', 0)} modules ({info['method']}, as {info['as']}) of {parts} into {out}")
    if "svd_relative_residual" in stats:
        console.print(f"SVD rank {info['rank']}: relative residual {stats['svd_relative_residual']:.3g} "
                      "(per module in medmerge.yml)")
    if "verified" in record:
        v = record["verified"]
        console.print(f"verified ({v['mode']}): largest abs error {v['max_abs_error']:.3g}")
    for note in record.get("notes", []):
        console.print(f"note: {note}")


pipeline_app = typer.Typer(no_args_is_help=True, help="Multi-step recipes.")
app.add_typer(pipeline_app, name="pipeline")


@pipeline_app.command("two-stage-lora")
def two_stage_lora_cmd(
    config: Path = typer.Argument(..., help="recipe YAML (see examples/two_stage_lora.yaml)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="KEY=VALUE overrides, e.g. merge.w_pt=[0,0.5]"),
    out: Path = typer.Option(..., "--out", help="run folder; an interrupted run continues where it stopped"),
    force: bool = typer.Option(False, "--force", help="start over in OUT"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """PT LoRA, a fresh SFT LoRA, exact weighted merges of the two, evaluation of each, and a table."""
    from .pipelines.two_stage_lora import run

    try:
        results = run(config, out, overrides=overrides or [], force=force, progress=not quiet)
    except MedmergeError as e:
        _fail(e)
    Console().print((out / "results.md").read_text())
    console.print(f"results: {out / 'results.json'}; wall time {results['wall_time_s']} s")


@app.command("sweep")
def sweep_cmd(
    config: Path = typer.Argument(..., help="sweep YAML (see examples/sweep_miniclinic.yaml, docs/sweeps.md)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="KEY=VALUE overrides, e.g. eval.limit=50"),
    out: Path = typer.Option(Path("runs/sweep"), "--out", help="run folder (sweep.jsonl, summary, plots, cache/)"),
    search: Optional[str] = typer.Option(None, "--search", help="optuna: multi-objective search (the search: "
                                         "section) instead of the grid"),
    trials: Optional[int] = typer.Option(None, "--trials", help="optuna: completed trials the study stops at"),
    storage: Optional[str] = typer.Option(None, "--storage", help="optuna study storage shared by workers: "
                                          "sqlite:///study.db or postgresql://... (default OUT/study.db)"),
    worker: int = typer.Option(0, "--worker", help="this worker's index (distinct per worker; seeds its sampler)"),
    limit: Optional[float] = typer.Option(None, "--limit", help="score each point on the first N documents of each "
                                          "task (or a fraction < 1); overrides eval.limit"),
    subset: Optional[int] = typer.Option(None, "--subset", help="score each point on a fixed, seeded dev subset of N "
                                         "documents per task; overrides eval.subset"),
    export_best: Optional[Path] = typer.Option(None, "--export-best", help="write the best point's merge here"),
    cache: Optional[Path] = typer.Option(None, "--cache", help="result cache folder (default OUT/cache; share it "
                                         "between sweeps of the same models)"),
    force: bool = typer.Option(False, "--force", help="drop OUT's cached results and replace --export-best"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Merge in memory over a grid or an optuna search, evaluate each point, report the Pareto front and best."""
    from .sweep.run import run

    try:
        overrides = list(overrides or []) + ([f"eval.limit={limit}"] if limit is not None else []) \
            + ([f"eval.subset={subset}"] if subset is not None else [])
        summary = run(config, out, overrides=overrides, force=force, export_best=export_best,
                      export_force=force, search=search, trials=trials, storage=storage, worker=worker, cache=cache,
                      progress=not quiet)
    except MedmergeError as e:
        _fail(e)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted:[/] finished points are cached in OUT/cache; run again to resume")
        raise typer.Exit(130)
    Console().print((out / "sweep.md").read_text())
    e = summary["evaluations"]
    console.print(f"{summary['points']} points, {e['run']} evaluations run, {e['cached']} from cache -> {out}")
    if summary.get("exported"):
        console.print(f"best merge written to {summary['exported']['path']}")


@app.command("fewshot")
def fewshot_cmd(
    config: Path = typer.Argument(..., help="few-shot YAML (see examples/fewshot_miniclinic.yaml)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="KEY=VALUE overrides, e.g. k=[16,64]"),
    out: Path = typer.Option(Path("runs/fewshot"), "--out", help="run folder; an interrupted run continues"),
    force: bool = typer.Option(False, "--force", help="start over in OUT"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Fine-tune each starting point (instruct, a merge) on k examples; plot score against k; test the claim."""
    from .fewshot import run

    try:
        result = run(config, out, overrides=overrides or [], force=force, progress=not quiet)
    except MedmergeError as e:
        _fail(e)
    Console().print((out / "fewshot.md").read_text())
    console.print(f"results: {out / 'fewshot.json'}; plot {out / 'fewshot.png'}; wall time {result['wall_time_s']} s")


@app.command("report")
def report_cmd(
    run: Path = typer.Argument(..., help="a run folder: medmerge demo, sweep, fewshot or pipeline output"),
    title: Optional[str] = typer.Option(None, "--title", help="the report's title"),
    force: bool = typer.Option(False, "--force", help="replace an existing report.html / report.md"),
) -> None:
    """Write RUN/report.html (self-contained, images embedded) and RUN/report.md."""
    from .report import write_report

    try:
        info = write_report(run, title=title, force=force)
    except MedmergeError as e:
        _fail(e)
    console.print(f"{len(info['sections'])} sections, {info['images']} images -> {info['html']} and {info['md']}")


analyze_app = typer.Typer(no_args_is_help=True, help="Decoding sensitivity, reasoning leakage, loss curves.")
app.add_typer(analyze_app, name="analyze")


@analyze_app.command("decoding")
def analyze_decoding_cmd(
    model: Path = typer.Argument(..., help="a local model folder"),
    tasks: str = typer.Option(..., "--tasks", help="comma-separated task names"),
    out: Path = typer.Option(..., "--out", help="output folder"),
    setting: Optional[list[str]] = typer.Option(None, "--setting", help="greedy, or t=0.6,p=0.8 / rp=1.2 (repeat); "
                                                "default: greedy, t=0.6,p=0.8, t=0.7,p=0.9, rp=1.2"),
    include_path: Optional[list[Path]] = typer.Option(None, "--include-path", help="extra task folder (repeat)"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="data folder of the tasks"),
    limit: Optional[float] = typer.Option(None, "--limit", help="samples per task"),
    batch_size: int = typer.Option(8, "--batch-size"),
    device: str = typer.Option("auto", "--device"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens"),
    seed: int = typer.Option(1234, "--seed", help="seed of the sampled settings (recorded)"),
    pattern: str = typer.Option(r"<think>.*?</think>", "--reasoning-pattern", help="regex of a reasoning span"),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Evaluate MODEL under a grid of decoding settings: a table and a plot per metric, and reasoning leakage."""
    from .analysis import decoding_grid, decoding_table

    settings = setting or ["greedy", "t=0.6,p=0.8", "t=0.7,p=0.9", "rp=1.2"]
    try:
        report = decoding_grid(model, settings, [t.strip() for t in tasks.split(",") if t.strip()], out,
                               max_new_tokens=max_new_tokens, reasoning_pattern=pattern, force=force,
                               include_paths=include_path or [], data_dir=data_dir, limit=limit,
                               batch_size=batch_size, device=device, seed=seed)
    except MedmergeError as e:
        _fail(e)
    Console().print(decoding_table(report))
    console.print(f"wrote {out / 'decoding.json'}, decoding.md, decoding.png")


def _labelled(runs: list[str]) -> dict[str, str]:
    """'LABEL=PATH' or 'PATH' (labelled by its folder name) -> {label: path}."""
    return dict(r.split("=", 1) if "=" in r else (Path(r).name, r) for r in runs)


@analyze_app.command("leakage")
def analyze_leakage_cmd(
    runs: list[str] = typer.Argument(..., help="eval folders written with --log-samples, as DIR or LABEL=DIR"),
    pattern: str = typer.Option(r"<think>.*?</think>", "--reasoning-pattern", help="regex of a reasoning span"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the counts here"),
) -> None:
    """Share of generated outputs that contain a reasoning span, per run and task."""
    from .analysis import reasoning_leakage

    try:
        report = reasoning_leakage(_labelled(runs), pattern)
    except MedmergeError as e:
        _fail(e)
    table = Table(title=f"reasoning leakage ({pattern})")
    for col in ("run", "outputs", "with a reasoning span", "rate"):
        table.add_column(col)
    for label, r in report.items():
        table.add_row(label, str(r["outputs"]), str(r["matches"]), f"{r['rate']:.3f}")
    Console().print(table)
    if json_out:
        json_out.write_text(json.dumps(report, indent=2) + "\n")


@analyze_app.command("loss")
def analyze_loss_cmd(
    runs: list[str] = typer.Argument(..., help="training output folders or train_log.jsonl files, as PATH or "
                                     "LABEL=PATH"),
    out: Path = typer.Option(..., "--out", help="PNG to write"),
    title: str = typer.Option("training loss", "--title"),
) -> None:
    """One plot with the training (and eval) loss of several `medmerge train` runs."""
    from .analysis import loss_curves

    try:
        loss_curves(_labelled(runs), out, title)
    except MedmergeError as e:
        _fail(e)
    console.print(f"wrote {out}")



medcare_app = typer.Typer(no_args_is_help=True, help="MedCare: knowledge aggregation, then orthogonal alignment.")
app.add_typer(medcare_app, name="medcare")


def _medcare_stage(kind: str, config: Path, overrides: Optional[list[str]], out: Path, force: bool, resume: bool,
                   quiet: bool) -> None:
    from .medcare.config import load_stage_config
    from .medcare.train import run_stage1, run_stage2

    try:
        cfg = load_stage_config(kind, config, overrides or [])
        result = (run_stage1 if kind == "stage1" else run_stage2)(cfg, out, force=force, resume=resume,
                                                                    progress=not quiet)
    except MedmergeError as e:
        _fail(e)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted:[/] nothing was written; checkpoints are kept for --resume")
        raise typer.Exit(130)
    console.print(f"MedCare {kind}: {result.steps} steps in {result.seconds:.1f}s (final loss "
                  f"{result.train_loss:.4f}, {result.tokens_per_second:.0f} tokens/s) -> {out}")


_STAGE_HELP = dict(
    overrides=typer.Argument(None, help="KEY=VALUE overrides, e.g. training.max_steps=200 alignment.lambda=1.0"),
    out=typer.Option(..., "--out", help="run folder (MedCare tensors, config, logs; written atomically)"),
    force=typer.Option(False, "--force", help="replace OUT if it exists"),
    resume=typer.Option(False, "--resume", help="continue from the last checkpoint in OUT.medmerge-work/"),
    quiet=typer.Option(False, "--quiet", "-q", help="no progress bar"),
)


@medcare_app.command("stage1")
def medcare_stage1_cmd(
    config: Path = typer.Argument(..., help="stage-1 YAML: model, data (knowledge + alignment), modules, training"),
    overrides: Optional[list[str]] = _STAGE_HELP["overrides"],
    out: Path = _STAGE_HELP["out"],
    force: bool = _STAGE_HELP["force"],
    resume: bool = _STAGE_HELP["resume"],
    quiet: bool = _STAGE_HELP["quiet"],
) -> None:
    """Stage 1: attention LoRA + FFN knowledge aggregator with routed noise experts."""
    _medcare_stage("stage1", config, overrides, out, force, resume, quiet)


@medcare_app.command("stage2")
def medcare_stage2_cmd(
    config: Path = typer.Argument(..., help="stage-2 YAML: stage1 (run folder), data (alignment), alignment"),
    overrides: Optional[list[str]] = _STAGE_HELP["overrides"],
    out: Path = _STAGE_HELP["out"],
    force: bool = _STAGE_HELP["force"],
    resume: bool = _STAGE_HELP["resume"],
    quiet: bool = _STAGE_HELP["quiet"],
) -> None:
    """Stage 2: attention merged and frozen, noise dropped, alignment module orthogonal to the knowledge one."""
    _medcare_stage("stage2", config, overrides, out, force, resume, quiet)


@medcare_app.command("export")
def medcare_export_cmd(
    run: Path = typer.Argument(..., help="a stage-2 run folder (or stage 1 with --drop-noise)"),
    out: Path = typer.Option(..., "--out", help="output model folder (sharded safetensors, written atomically)"),
    base: Optional[Path] = typer.Option(None, "--base", help="the base model, if it moved since training"),
    drop_noise: bool = typer.Option(False, "--drop-noise", help="stage 1: export the knowledge path only"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: the base's)"),
    shard_size: str = typer.Option("5GB", "--shard-size", help="largest shard, in bytes with a unit (5GB, 500MB)"),
    no_verify: bool = typer.Option(False, "--no-verify", help="skip the logits check (tensors are still read back)"),
    device: str = typer.Option("cpu", "--device", help="where the logits check runs (cpu, cuda)"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it exists"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Fold a MedCare run into a plain checkpoint that transformers loads, verified on logits."""
    from .medcare.export import export

    try:
        record = export(run, out, base=base, drop_noise=drop_noise, dtype=dtype, shard_size=shard_size,
                        verify=not no_verify, device=device, force=force, progress=not quiet)
    except MedmergeError as e:
        _fail(e)
    v = record.get("verified")
    if v:
        console.print(f"verified: max |logit diff| {v['max_abs_diff']:.3g} <= {v['tolerance']:.3g} "
                      f"({v['tolerance_rule']}); argmax agreement {v['argmax_agreement']:.4f}")
    console.print(f"exported {record['medmerge']['modules_folded']} folded projections -> {out}")


@pipeline_app.command("medcare")
def medcare_pipeline_cmd(
    config: Path = typer.Argument(..., help="experiment YAML (see examples/medcare_miniclinic.yaml)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="KEY=VALUE overrides, e.g. stage2.alignment.lambda=1"),
    out: Path = typer.Option(..., "--out", help="run folder; an interrupted run continues where it stopped"),
    force: bool = typer.Option(False, "--force", help="start over in OUT"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """MedCare (two stages, exported) vs plain LoRA vs full fine-tuning, plus the keep-noise ablation, evaluated."""
    from .pipelines.medcare import run

    try:
        results = run(config, out, overrides=overrides or [], force=force, progress=not quiet)
    except MedmergeError as e:
        _fail(e)
    Console().print((out / "results.md").read_text())
    console.print(f"results: {out / 'results.json'}; wall time {results['wall_time_s']} s")


if __name__ == "__main__":
    app()
