"""`medmerge demo`, `medmerge sweep`, `medmerge compare-methods`, `medmerge fewshot`, `medmerge report`,
`medmerge pipeline ...`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import typer

from ..experiments import medcare_vs_lora, real, two_stage_lora
from ..experiments.demo import run_demo
from ..experiments.fewshot import run as run_fewshot
from ..experiments.methods_compared import run as run_methods_compared
from ..experiments.report import write_report
from ..experiments.sweep.run import run as run_sweep
from .app import app, pipeline_app
from .common import command, console, stdout


@command(app, "demo", interrupted="finished steps are kept in OUT; run again to continue")
def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="the demo's run folder (world, sweep, fewshot, report)"),
    preset: str = typer.Option("quick", "--preset", help="quick (<= 4 min on 2 cores), full (<= 15 min), or real: "
                               "SmolLM2-135M-Instruct on real clinical data (85-90 min on 2 cores; needs --data-dir)"),
    seed: int = typer.Option(0, "--seed", help="seed of the world, the merges and the fine-tuning"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="real preset: the data folder (IFEval, "
                                            "PubMedQA, MedQA, MTS-Dialog, MeQSum, MedQuAD); default $MEDMERGE_DATA"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """The whole experiment on the synthetic clinical world (or a real model): forgetting, sweep, few-shot, report."""
    if preset == "real":
        result = real.run_preset(out, data_dir=data_dir, seed=seed, progress=not quiet)
        stdout.print(result.markdown)
        console.print(f"results: {out / 'results.json'}; report {out / 'report.html'}; wall time "
                      f"{result['wall_time_s']} s")
        return
    run_demo(out, preset=preset, seed=seed, progress=not quiet)


@command(app, "sweep", interrupted="finished points are cached in OUT/cache; run again to resume")
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
    summary = run_sweep(config, out, overrides=overrides or [], force=force, export_best=export_best,
                        export_force=force, search=search, trials=trials, storage=storage, worker=worker, cache=cache,
                        limit=limit, subset=subset, progress=not quiet)
    stdout.print(summary.markdown)
    e = summary["evaluations"]
    console.print(f"{summary['points']} points, {e['run']} evaluations run, {e['cached']} from cache -> {out}")
    if summary.get("exported"):
        console.print(f"best merge written to {summary['exported']['path']}")


@command(app, "compare-methods", interrupted="finished evaluations are cached in OUT/cache; run again to resume")
def compare_methods_cmd(
    config: Path = typer.Argument(..., help="comparison YAML (see examples/methods_compared_miniclinic.yaml)"),
    out: Path = typer.Argument(..., help="run folder (methods_compared.json/.md/.png, cache/)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="KEY=VALUE overrides, e.g. split.dev=8"),
    cache: Optional[Path] = typer.Option(None, "--cache", help="result cache folder (default OUT/cache; shareable "
                                         "with sweeps of the same models)"),
    force: bool = typer.Option(False, "--force", help="drop OUT's cached results and start over"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Every merge method, its setting chosen on dev documents, judged on held-out ones with the same budget."""
    result = run_methods_compared(config, out, overrides=overrides or [], force=force, cache=cache,
                                  progress=not quiet)
    stdout.print(result.markdown)
    e = result["evaluations"]
    console.print(f"{len(result['chosen'])} methods compared, {len(result['left_out'])} left out; {e['run']} "
                  f"evaluations run, {e['cached']} from cache -> {out}")


@command(app, "fewshot", interrupted="finished steps are kept in OUT; run again to continue")
def fewshot_cmd(
    config: Path = typer.Argument(..., help="few-shot YAML (see examples/fewshot_miniclinic.yaml)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="KEY=VALUE overrides, e.g. k=[16,64]"),
    out: Path = typer.Option(Path("runs/fewshot"), "--out", help="run folder; an interrupted run continues"),
    force: bool = typer.Option(False, "--force", help="start over in OUT"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Fine-tune each starting point (instruct, a merge) on k examples; plot score against k; test the claim."""
    result = run_fewshot(config, out, overrides=overrides or [], force=force, progress=not quiet)
    stdout.print(result.markdown)
    console.print(f"results: {out / 'fewshot.json'}; plot {out / 'fewshot.png'}; wall time {result['wall_time_s']} s")


@command(app, "report")
def report_cmd(
    run: Path = typer.Argument(..., help="a run folder: medmerge demo, sweep, fewshot or pipeline output"),
    title: Optional[str] = typer.Option(None, "--title", help="the report's title"),
    force: bool = typer.Option(False, "--force", help="replace an existing report.html / report.md"),
) -> None:
    """Write RUN/report.html (self-contained, images embedded) and RUN/report.md."""
    info = write_report(run, title=title, force=force)
    console.print(f"{len(info['sections'])} sections, {info['images']} images -> {info['html']} and {info['md']}")


def _pipeline_command(name: str, config_help: str, override: str, doc: str, recipe: Callable) -> None:
    """`medmerge pipeline NAME CONFIG --out OUT`: a recipe's run folder, its table printed."""
    def pipeline_cmd(
        config: Path = typer.Argument(..., help=config_help),
        overrides: Optional[list[str]] = typer.Argument(None, help=f"KEY=VALUE overrides, e.g. {override}"),
        out: Path = typer.Option(..., "--out", help="run folder; an interrupted run continues where it stopped"),
        force: bool = typer.Option(False, "--force", help="start over in OUT"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    ) -> None:
        results = recipe(config, out, overrides=overrides or [], force=force, progress=not quiet)
        stdout.print(results.markdown)
        console.print(f"results: {out / 'results.json'}; wall time {results['wall_time_s']} s")

    pipeline_cmd.__doc__ = doc
    command(pipeline_app, name, interrupted="finished steps are kept in OUT; run again to continue")(pipeline_cmd)


_pipeline_command("two-stage-lora", "recipe YAML (see examples/two_stage_lora.yaml)", "merge.w_pt=[0,0.5]",
                  "PT LoRA, a fresh SFT LoRA, exact weighted merges of the two, evaluation of each, and a table.",
                  two_stage_lora.run)
_pipeline_command("real", "recipe YAML (see examples/real_smollm2.yaml)", "eval.limit=100",
                  "A real instruct model (GGUF import or folder): clinical and instruct_ft trained, both merge sweeps, "
                  "few-shot, report.", real.run)
_pipeline_command("medcare", "experiment YAML (see examples/medcare_miniclinic.yaml)", "stage2.alignment.lambda=1",
                  "MedCare (two stages, exported) vs plain LoRA vs full fine-tuning, plus the keep-noise ablation, "
                  "evaluated.", medcare_vs_lora.run)
