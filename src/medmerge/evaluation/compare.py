"""`medmerge compare`: what each model kept or lost relative to its parents.

Scores are put on one 0-100 scale (accuracies x 100; generation metrics are
already 0-100). With I the instruction-following score and C the clinical
score (definitions below), for a model m and references `instruct` and
`clinical`:

    delta_ref(metric)       = score_m(metric) - score_ref(metric)
    IF retention (%)        = 100 * I(m) / I(instruct)
    clinical gain kept (%)  = 100 * (C(m) - C(instruct)) / (C(clinical) - C(instruct))

I defaults to the mean of mm_ifeval's four accuracies (`--if-metric TASK/METRIC`
picks one metric, `TASK/mean` a task's mean). C defaults to the mean, over
every task other than the instruction-following one that all inputs share, of
that task's `composite` (generation) or `acc` (multiple choice);
`--clinical-metric TASK/METRIC` (repeatable) chooses the parts. The gain kept is
undefined when the clinical model does not differ from the instruct model on C.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from ..errors import InputError, MedmergeError
from ..io.records import NotText, read_json
from ..io.writer import atomic_output_dir, check_output
from ..runtime import pyplot
from ..merging.deltas import render_markdown as render_task_vectors
from ..merging.deltas import task_vectors
from .bootstrap import retention_intervals
from .results import SCHEMA
from .scores import default_clinical_parts, relative_scores, summary_scores

IF_DEFAULT = "mm_ifeval/mean"


def load_results(path: str | Path) -> tuple[str, dict]:
    """(label, results) from a results.json or an eval output folder; the label is the folder name."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"{file} does not exist; pass a results.json or a folder written by `medmerge eval`")
    try:
        results = read_json(file, dict, "a medmerge results file (a JSON object)")
    except NotText:
        raise InputError(f"{file} is not a text file (a model file?); pass a results.json or a folder written by "
                         "`medmerge eval`") from None
    if results.get("schema") != SCHEMA or "tasks" not in results:
        hint = " (it looks like lm-eval's own output: evaluate with `medmerge eval` for medmerge's schema)" \
            if "results" in results and "configs" in results else ""
        raise InputError(f"{file} is not a medmerge results file (schema {SCHEMA}){hint}; write it with "
                         "`medmerge eval`")
    check_results(file, results)
    return file.parent.name, results


def check_results(file: Path, results: dict) -> None:
    """The parts of a results file that compare reads: {task: {metric: number or null}}, {task: {metric: reason}}."""
    tasks = results["tasks"]
    if not isinstance(tasks, dict) or not all(isinstance(row, dict) for row in tasks.values()):
        raise InputError(f"{file}: 'tasks' must map each task to its metrics ({{task: {{metric: value}}}}); "
                         "the file was not written by `medmerge eval`, or was edited")
    for task, row in tasks.items():
        for metric, value in row.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise InputError(f"{file}: tasks.{task}.{metric} is {value!r}, not a number (or null); the file was "
                                 "not written by `medmerge eval`, or was edited")
    unavailable = results.get("unavailable", {})
    if not isinstance(unavailable, dict) or not all(isinstance(row, dict) for row in unavailable.values()):
        raise InputError(f"{file}: 'unavailable' must map each task to {{metric: reason}}")


def has_metric(results: dict, spec: str) -> bool:
    """Whether the results hold TASK/METRIC (TASK/mean: the task)."""
    task, metric = spec.split("/", 1)
    row = results["tasks"].get(task)
    return row is not None and (metric == "mean" or metric in row)


def check_metric(spec: str, flag: str, entries: Sequence[tuple[str, str, dict]], notes: list[str], *,
                 required: bool = True) -> None:
    """An unknown metric is an error listing the metrics found; one some inputs lack is a note naming them."""
    if "/" not in spec:
        raise InputError(f"{flag} {spec!r}: use TASK/METRIC, e.g. mm_ifeval/prompt_level_strict_acc")
    lacking = [name for name, _, res in entries if not has_metric(res, spec)]
    if len(lacking) == len(entries):
        if not required:
            notes.append(f"no input has {spec}: its score is undefined (choose one with {flag} TASK/METRIC)")
            return
        found = sorted({f"{t}/{m}" for _, _, res in entries for t, row in res["tasks"].items() for m in row}
                       | {f"{t}/mean" for _, _, res in entries for t in res["tasks"]})
        shown = ", ".join(found[:60]) + (f", ... ({len(found)} in all)" if len(found) > 60 else "")
        raise InputError(f"{flag} {spec}: no input has it; metrics found: {shown or 'none'}")
    if lacking:
        notes.append(f"{spec} is missing from {', '.join(lacking)}: their score using it is undefined")


def parse_references(items: Sequence[str]) -> dict[str, Path]:
    """['instruct=runs/eval/instruct', ...] -> {"instruct": Path(...)} (`--reference NAME=RESULTS`)."""
    refs = {}
    for item in items:
        if "=" not in item:
            raise MedmergeError(f"--reference {item!r}: use NAME=RESULTS, e.g. instruct=runs/eval/instruct")
        name, path = item.split("=", 1)
        refs[name.strip()] = Path(path)
    return refs


def compare(
    results: Sequence[str | Path],
    references: dict[str, str | Path],
    *,
    out: Optional[str | Path] = None,
    if_metric: Optional[str] = None,
    clinical_metrics: Sequence[str] = (),
    force: bool = False,
    base: Optional[str | Path] = None,
    replicates: int = 2000,
    seed: int = 0,
) -> dict:
    """The comparison report (and OUT/comparison.{md,json}, tradeoff.png). `if_metric` None: IF_DEFAULT, a note
    (not an error) when no input has it; a metric named explicitly that no input has is an error.

    Results evaluated with per-document values (`--log-samples`) get paired bootstrap intervals of IF retention
    and clinical gain kept (`replicates`, `seed`). `base` (the models' common parent) adds each model's task
    vector (relative delta norms, and cosines between the models' deltas: mergeability)."""
    if not 100 <= replicates <= 100_000:
        raise MedmergeError(f"--replicates {replicates}: use 100 to 100000")
    if out is not None:  # replaced with --force: it must not be, hold or lie inside a results file it reads
        check_output(Path(out).absolute(), force, [*results, *references.values()])
    entries: list[tuple[str, str, dict]] = []  # (name, path, results)
    seen: dict[str, str] = {}
    for name, path in references.items():
        _, res = load_results(path)
        entries.append((name, str(path), res))
        seen[str(Path(path).resolve())] = name
    for path in results:
        label, res = load_results(path)
        if str(Path(path).resolve()) in seen:
            continue
        names = {e[0] for e in entries}
        while label in names:
            label += "'"
        entries.append((label, str(path), res))
    if not entries:
        raise MedmergeError("nothing to compare: pass results.json files or eval folders")
    all_res = [e[2] for e in entries]
    notes: list[str] = []
    check_metric(if_metric or IF_DEFAULT, "--if-metric", entries, notes, required=if_metric is not None)
    if_metric = if_metric or IF_DEFAULT
    for spec in clinical_metrics:
        check_metric(spec, "--clinical-metric", entries, notes)
    if_task = if_metric.split("/", 1)[0]
    parts = list(clinical_metrics) or default_clinical_parts(all_res, if_task)
    if not parts:
        notes.append("no clinical task is shared by all inputs: the clinical score is undefined")

    def summary(res: dict) -> dict:
        return summary_scores(res, if_metric, parts)

    by_name = {name: res for name, _, res in entries}
    ref_summary = {name: summary(by_name[name]) for name in references}
    instruct, clinical = ref_summary.get("instruct"), ref_summary.get("clinical")
    if instruct is None:
        notes.append("no --reference instruct=...: instruction-following retention is undefined")
    if clinical is None or instruct is None:
        notes.append("needs --reference instruct=... and clinical=...: clinical gain kept is undefined")
    rows = []
    for name, path, res in entries:
        s = summary(res)
        row = {"name": name, "path": path, "reference": name in references, **s, "scores": res["tasks"],
               "unavailable": res.get("unavailable", {}), "deltas": {}}
        for ref in references:
            ref_res = by_name[ref]
            deltas = {}
            for task, metrics_ in res["tasks"].items():
                for metric, value in metrics_.items():
                    other = ref_res["tasks"].get(task, {}).get(metric)
                    if value is not None and other is not None:
                        deltas[f"{task}/{metric}"] = value - other
            for key in ("if_score", "clinical_score"):
                a, b = s[key], ref_summary[ref][key]
                deltas[key] = None if a is None or b is None else a - b
            row["deltas"][ref] = deltas
        row.update(relative_scores(s, instruct, clinical))
        if instruct:
            row.update(retention_intervals(res.get("per_doc"), by_name["instruct"].get("per_doc"),
                                           (by_name.get("clinical") or {}).get("per_doc") if clinical else None,
                                           if_metric, parts, replicates=replicates, seed=seed))
        rows.append(row)
    if instruct and clinical and clinical["clinical_score"] is not None and instruct["clinical_score"] is not None \
            and abs(clinical["clinical_score"] - instruct["clinical_score"]) <= 1e-9:
        notes.append("the clinical and instruct references score the same clinical score: gain kept is undefined")
    report = {
        "models": rows,
        "references": {name: str(path) for name, path in references.items()},
        "if_metric": if_metric,
        "clinical_metrics": parts,
        "scale": "0-100 (accuracies x 100)",
        "formulas": {
            "delta": "score(model) - score(reference), per task/metric and for the two summary scores",
            "if_retention_pct": "100 * IF(model) / IF(instruct)",
            "clinical_gain_kept_pct": "100 * (C(model) - C(instruct)) / (C(clinical) - C(instruct))",
        },
        "intervals": f"95% paired bootstrap over the evaluation documents ({replicates} replicates, seed {seed}); "
                     "only for results written with per-document values (medmerge eval --log-samples)",
        "notes": notes,
        "task_vectors": _task_vectors(base, entries, notes) if base is not None else None,
    }
    if out is not None:
        write_report(Path(out), report, force)
    return report


def _task_vectors(base: str | Path, entries: list[tuple[str, str, dict]], notes: list[str]) -> Optional[dict]:
    """Task vectors from `base` of every compared model whose results name its model folder."""
    models, base_path = {}, Path(base).absolute()
    for name, _, res in entries:
        path = (res.get("model") or {}).get("path")
        if not path:
            notes.append(f"{name}: its results name no model folder; no task vector")
        elif (res.get("model") or {}).get("peft"):
            notes.append(f"{name}: evaluated with a PEFT adapter; no task vector (merge the adapter first)")
        elif Path(path).absolute() == base_path:
            continue
        elif not Path(path).is_dir():
            notes.append(f"{name}: model folder {path} (from its results) is not there; no task vector")
        else:
            models[name] = path
    return task_vectors(base_path, models) if models else None


def fmt_score(v, digits: int = 1, missing: str = "-") -> str:
    """A score for a table: fixed digits, `missing` for None; anything else as text."""
    if v is None:
        return missing
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else str(v)


def _fmt(v: Optional[float], digits: int = 2) -> str:
    return fmt_score(v, digits, missing="n/a")


def fmt_with_ci(value: Optional[float], ci: Optional[dict], missing: str = "n/a") -> str:
    """`value [low, high]` with one digit (an interval dict from evaluation.bootstrap); the value alone without one."""
    if value is None or not ci or ci.get("low") is None:
        return fmt_score(value, 1, missing=missing)
    return f"{value:.1f} [{ci['low']:.1f}, {ci['high']:.1f}]"


def render_markdown(report: dict) -> str:
    rows = report["models"]
    metric_keys = sorted({f"{t}/{m}" for r in rows for t, ms in r["scores"].items() for m in ms})
    lines = [
        f"IF = {report['if_metric']}; clinical = mean of {', '.join(report['clinical_metrics']) or 'nothing'}; "
        f"scale {report['scale']}.",
        "",
        "| model | IF | clinical | IF retention % [95% CI] | clinical gain kept % [95% CI] |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        name = f"**{r['name']}** (ref)" if r["reference"] else r["name"]
        lines.append(f"| {name} | {_fmt(r['if_score'])} | {_fmt(r['clinical_score'])} | "
                     f"{fmt_with_ci(r['if_retention_pct'], r.get('if_retention_ci'))} | "
                     f"{fmt_with_ci(r['clinical_gain_kept_pct'], r.get('clinical_gain_kept_ci'))} |")
    lines += ["", "| model | " + " | ".join(metric_keys) + " |", "|---" * (len(metric_keys) + 1) + "|"]
    for r in rows:
        cells = []
        for key in metric_keys:
            task, metric = key.split("/", 1)
            value = r["scores"].get(task, {}).get(metric)
            unavailable = metric in r["unavailable"].get(task, {})
            cells.append("unavailable" if unavailable and value is None else _fmt(value, 4))
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    for ref in report["references"]:
        lines += ["", f"Deltas to **{ref}**:", "",
                  "| model | IF | clinical | " + " | ".join(metric_keys) + " |",
                  "|---" * (len(metric_keys) + 3) + "|"]
        for r in rows:
            d = r["deltas"][ref]
            lines.append(f"| {r['name']} | {_fmt(d['if_score'], 2)} | {_fmt(d['clinical_score'], 2)} | "
                         + " | ".join(_fmt(d.get(k), 4) for k in metric_keys) + " |")
    if report.get("task_vectors"):
        lines += ["", "Mergeability (task vectors from the base):", "", render_task_vectors(report["task_vectors"])]
    if report["notes"]:
        lines += [""] + [f"note: {n}" for n in report["notes"]]
    if any(r.get("if_retention_ci") or r.get("clinical_gain_kept_ci") for r in rows):
        lines += ["", f"Intervals: {report['intervals']}."]
    lines += ["", "Formulas: " + "; ".join(f"{k} = {v}" for k, v in report["formulas"].items()) + "."]
    return "\n".join(lines) + "\n"


def plot_tradeoff(report: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in report["models"]:
        if r["if_score"] is None or r["clinical_score"] is None:
            continue
        marker, color = ("*", "tab:red") if r["reference"] else ("o", "tab:blue")
        ax.scatter(r["if_score"], r["clinical_score"], marker=marker, s=140 if r["reference"] else 50, color=color)
        ax.annotate(r["name"], (r["if_score"], r["clinical_score"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(f"instruction following ({report['if_metric']}, 0-100)")
    ax.set_ylabel("clinical score (0-100)")
    ax.set_title("Instruction following vs clinical skill")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, report: dict, force: bool) -> None:
    with atomic_output_dir(out, force=force) as tmp:
        (tmp / "comparison.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "comparison.md").write_text(render_markdown(report))
        plot_tradeoff(report, tmp / "tradeoff.png")
