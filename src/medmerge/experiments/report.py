"""`medmerge report RUN_DIR`: one self-contained report.html (images embedded) and a report.md.

It gathers what it finds under RUN_DIR: a demo record (`demo.json`: the forgetting
table), sweeps (`sweep_summary.json` + `sweep.jsonl`: the models table with
`medmerge compare`'s retention columns, score against t per method, the Pareto
plot), methods comparisons (`methods_compared.json`: the held-out table, what it
says, the plot), few-shot runs (`fewshot.json`: curves and the claim), two-stage LoRA runs
(`results.json`: loss curves and decoding tables), decoding grids
(`decoding.json`), and the configuration and library versions of each.
Both files are built from one list of sections, so they say the same thing.
"""

from __future__ import annotations

import base64
import html
import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from ..errors import InputError, OutputExistsError
from ..evaluation.compare import fmt_score as _f
from ..evaluation.compare import fmt_with_ci
from ..merging.deltas import fmt_cos, fmt_pct
from ..io.records import read_jsonl
from ..io.writer import current_umask
from .analysis import decoding_table
from .methods_compared import methods_table, summary_paragraphs
from .rundir import resolved_name
from .two_stage_lora import render as render_two_stage


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[tuple[list[str], list[list[str]]]] = field(default_factory=list)
    images: list[tuple[Path, str]] = field(default_factory=list)  # (png, caption)
    code: list[tuple[str, str]] = field(default_factory=list)  # (caption, text)


def _read(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read it as JSON ({e}); re-run the step that wrote it") from None
    if not isinstance(record, dict):
        raise InputError(f"{path}: expected a JSON object (a record medmerge writes), not a {type(record).__name__}; "
                         "re-run the step that wrote it, or move the file out of the run folder")
    return record


def _rows(path: Path) -> list[dict]:
    return read_jsonl(path)  # a damaged line is an error naming the file and the line


def _built(builder, file: Path | str, *args) -> list[Section]:
    """`builder(*args)`, with a record that lacks what the section needs (an edited or foreign file, one from
    another version) turned into an InputError naming the file and the key."""
    try:
        return builder(*args)
    except KeyError as e:
        what = f"it has no key {e}"
    except (TypeError, AttributeError, IndexError, ValueError) as e:
        what = f"a value has the wrong type or form ({type(e).__name__}: {e})"
    raise InputError(f"{file}: not a complete record for the report ({what}); re-run the step that wrote it, or "
                     "move the file out of the run folder") from None


# --- sections ---------------------------------------------------------------------------------------------------------


def demo_sections(run: Path) -> list[Section]:
    file = run / "demo.json"
    if not file.is_file():
        return []
    demo = _read(file)
    f = demo["forgetting"]
    s = Section("Forgetting: fine-tuning the instruct model on the clinical task", paragraphs=[
        f"`{f['after']}` is `{f['before']}` fine-tuned on the clinical task. Scores on the 0-100 scale "
        f"({f['if_metric']} for instruction following; clinical = mean of {', '.join(f['clinical_metrics'])})."])
    s.tables.append((["model", "instruction following", "clinical composite"],
                     [[m["name"], _f(m["if_score"]), _f(m["clinical_score"])] for m in f["models"]]))
    s.paragraphs.append(f["statement"])
    out = [s]
    if demo.get("headline"):
        out.append(Section("Summary", paragraphs=list(demo["headline"])))
    return out


def sweep_sections(folder: Path, run: Path) -> list[Section]:
    summary = _read(folder / "sweep_summary.json")
    rows = _rows(folder / "sweep.jsonl") if (folder / "sweep.jsonl").is_file() else []
    rel = folder.relative_to(run).as_posix() if folder != run else "."
    cols = [summary["if_metric"], *summary["clinical_metrics"]]
    head = ["model", "kind", *cols, "IF", "clinical", "IF retention % [95% CI]", "clinical gain kept % [95% CI]"]
    best_id = (summary.get("best") or {}).get("id")
    shown = [r for r in rows if r["kind"] == "reference" or r.get("pareto") or r["id"] == best_id]
    table = []
    for r in shown:
        kind = r["kind"] + (" (best)" if r["id"] == best_id else "") + (" (Pareto)" if r.get("pareto") and r["kind"] != "reference" else "")
        vals = []
        for c in cols:
            task, metric = c.split("/", 1)
            vals.append(_f((r["tasks"].get(task) or {}).get(metric), 3))
        table.append([r["label"], kind, *vals, _f(r["if_score"]), _f(r["clinical_score"]),
                      fmt_with_ci(r.get("if_retention_pct"), r.get("if_retention_ci"), "-"),
                      fmt_with_ci(r.get("clinical_gain_kept_pct"), r.get("clinical_gain_kept_ci"), "-")])
    models = Section(f"Models ({rel})", paragraphs=[
        f"The references, every merge on the Pareto front and the selected merge; {summary['points']} merges were "
        f"scored in memory on {', '.join(summary['tasks'])} ({summary['selection']}). Retention columns as "
        "`medmerge compare`: IF retention = 100 x IF(model) / IF(instruct); clinical gain kept = "
        "100 x (C(model) - C(instruct)) / (C(clinical) - C(instruct)); intervals: 95% paired bootstrap over the "
        "evaluation documents (the merge and the references resampled together)."], tables=[(head, table)])
    b = summary.get("best")
    models.paragraphs.append(
        f"Selection rule: {summary['select']['rule']}. " +
        (f"Best: {b['label']} (IF {_f(b['if_score'])}, clinical {_f(b['clinical_score'])}, IF retention "
         f"{fmt_with_ci(b.get('if_retention_pct'), b.get('if_retention_ci'), '-')}%, clinical gain kept "
         f"{fmt_with_ci(b.get('clinical_gain_kept_pct'), b.get('clinical_gain_kept_ci'), '-')}%)." if b
         else "No merge meets it."))
    e = summary["evaluations"]
    models.paragraphs.append(f"Evaluations run {e['run']}, from the cache {e['cached']}; merge time {e['merge_seconds']} s, "
                             f"evaluation {e['eval_seconds']} s, wall {summary['wall_time_s']} s.")
    plots = Section(f"Score against interpolation weight, and the Pareto front ({rel})")
    for name, caption in (("scores_vs_t.png", "Instruction following and clinical composite against t (the clinical "
                           "model's share): one line per method and setting (colour: method; line style: its "
                           "other parameters); dotted lines are the references."),
                          ("pareto.png", "Every merge: instruction following against clinical composite; the dashed "
                           "line is the Pareto front, stars the references, the red circle the selected merge.")):
        if (folder / name).is_file():
            plots.images.append((folder / name, caption))
    out = [models, plots]
    tv = summary.get("task_vectors")
    if tv:
        out.append(mergeability_section(tv, f"Mergeability: task vectors from the base ({rel})"))
    if summary.get("halving"):
        h = summary["halving"]
        a = h["agreement"]
        out.append(Section("Successive halving", paragraphs=[
            f"{len(h['rungs'])} rungs; {h['documents_scored']} documents scored instead of {h['documents_full_grid']} "
            f"for the full grid. Cheap (first rung) vs full ranking over {a['pairs']} candidates ({a['over']}): "
            f"Kendall tau {_f(a['kendall_tau'], 2)}, Spearman {_f(a['spearman'], 2)}."],
            tables=[(["rung", "documents", "candidates"], [[str(r["rung"]), r["selection"], str(r["candidates"])]
                                                           for r in h["rungs"]])]))
    if summary.get("search"):
        s = summary["search"]
        out.append(Section("Search", paragraphs=[
            f"optuna {s['sampler']} over {s['methods']} with space {s['space']} (layer groups {s['layer_groups']}): "
            f"{s['completed']} completed trials of {s['trials']} in study {s['study']} ({s['storage']}), "
            f"workers {s['workers']}."]))
    out.append(_config_section(f"Sweep configuration ({rel})", _recorded_config(folder, "sweep"), summary.get("versions")))
    return out


def methods_compared_sections(folder: Path, run: Path) -> list[Section]:
    """`medmerge compare-methods`: the held-out table, what it says, the plot, the methods left out."""
    res = _read(folder / "methods_compared.json")
    rel = folder.relative_to(run).as_posix() if folder != run else "."
    split = res["split"]
    sec = Section(f"Merge methods compared ({rel})", paragraphs=[
        f"Every method's setting chosen on {split['dev']} dev documents per task ({res['select']['rule']}), then "
        f"scored on held-out documents disjoint from them (split seed {split['seed']}). IF retained and clinical "
        "gain kept as `medmerge compare`; 95% paired bootstrap intervals over the held-out documents; vs best: the "
        "paired difference from the best method, \"within noise\" when its interval contains 0.",
        *summary_paragraphs(res),
        "Left out: " + ("; ".join(f"{x['method']} ({x['reason']})" for x in res["left_out"]) or "none") + "."],
        tables=[methods_table(res)])
    if (folder / "methods_compared.png").is_file():
        sec.images.append((folder / "methods_compared.png", "IF retained against clinical gain kept on the held-out "
                           "documents: one point per method (its chosen setting) with both 95% intervals; stars are "
                           "the references."))
    return [sec, _config_section(f"Methods comparison configuration ({rel})", _recorded_config(folder, "methods_compared"),
                                 res.get("versions"))]


def mergeability_section(tv: dict, title: str) -> Section:
    """The task-vector table (merging.deltas) as a report section."""
    rows = [[name, fmt_pct(m["non_embedding"]["relative_norm"]), fmt_pct(m["embedding"]["relative_norm"]),
             fmt_pct(m["all"]["relative_norm"])] for name, m in tv["models"].items()]
    cos = [f"{c['a']} / {c['b']}: {fmt_cos(c['non_embedding'])} (non-embedding), {fmt_cos(c['embedding'])} "
           f"(embedding)" for c in tv.get("cosines", [])]
    return Section(title, paragraphs=[
        f"How far each model moved from {Path(tv['parent']).name}: relative Frobenius norm ||W - W_base|| / "
        f"||W_base|| over the non-embedding and the embedding weights. A real LLM fine-tune moves its "
        f"non-embedding weights by about {fmt_pct(tv['real_llm_relative_norm'])}; moves of tens of percent leave "
        "no shared basin, and interpolation falls off a cliff.",
        "Cosine between the task vectors: " + ("; ".join(cos) if cos else "-") + "."],
        tables=[(["model", "non-embedding delta", "embedding delta", "all"], rows)])


def fewshot_sections(folder: Path, run: Path) -> list[Section]:
    res = _read(folder / "fewshot.json")
    rel = folder.relative_to(run).as_posix() if folder != run else "."
    table = []
    for name, s in res["starts"].items():
        table.append([name, "0", _f(s["if_score"]), _f(s["clinical_score"]), "-"])
        for r in (r for r in res["runs"] if r["start"] == name):
            table.append([name, str(r["k"]), _f(r["if_score"]), _f(r["clinical_score"]),
                          _f(r["train"].get("train_loss"), 3)])
    sec = Section(f"Few-shot efficiency ({rel})", paragraphs=[
        f"Each starting point fine-tuned on k examples of {Path(res['data']).name} (nested seeded subsets; the same "
        f"training settings and seed for every run: {res['training'].get('max_steps')} steps, batch "
        f"{res['training'].get('batch_size')}, lr {res['training'].get('lr')})."],
        tables=[(["start", "k", "instruction following", "clinical composite", "train loss"], table)])
    if res.get("claim"):
        sec.paragraphs += [res["claim"]["statement"], res["claim"]["measured"]]
    for name, caption in (("fewshot.png", "Score against k for each starting point (k = 0: before fine-tuning)."),
                          ("loss_curves.png", "Training loss of every few-shot run.")):
        if (folder / name).is_file():
            sec.images.append((folder / name, caption))
    return [sec, _config_section(f"Few-shot configuration ({rel})", _recorded_config(folder, "fewshot"),
                                 res.get("versions"))]


def two_stage_sections(folder: Path, run: Path) -> list[Section]:
    res = _read(folder / "results.json")
    rel = folder.relative_to(run).as_posix() if folder != run else "."
    sec = Section(f"Two-stage LoRA ({rel})", code=[("results.md", render_two_stage(res))])
    if (folder / "loss_curves.png").is_file():
        sec.images.append((folder / "loss_curves.png", "Training loss of both stages."))
    return [sec]


def decoding_sections(folder: Path, run: Path) -> list[Section]:
    rep = _read(folder / "decoding.json")
    rel = folder.relative_to(run).as_posix() if folder != run else "."
    sec = Section(f"Decoding sensitivity ({rel})", code=[("decoding table", decoding_table(rep))])
    for png in sorted(folder.glob("*.png")):
        sec.images.append((png, png.stem))
    return [sec]


def _recorded_config(folder: Path, name: str) -> Path:
    """The config a run recorded: NAME.resolved.yml, or NAME.yml in run folders written before it was renamed."""
    new = folder / resolved_name(name)
    return new if new.is_file() else folder / f"{name}.yml"


def _config_section(title: str, config_file: Path, versions: Optional[dict]) -> Section:
    s = Section(title)
    if config_file.is_file():
        s.code.append((config_file.name, config_file.read_text()))
    if versions:
        s.tables.append((["library", "version"], [[k, v] for k, v in sorted(versions.items())]))
    return s


def collect(run: Path) -> list[Section]:
    """Every section the run folder supports, in reading order."""
    sections = _built(demo_sections, run / "demo.json", run)
    found = sorted(p for p in run.rglob("*.json") if "cache" not in p.relative_to(run).parts
                   and "world" not in p.relative_to(run).parts[:1])
    for p in found:
        if p.name == "sweep_summary.json":
            sections += _built(sweep_sections, f"{p} (or a row of its sweep.jsonl)", p.parent, run)
    for p in found:
        if p.name == "methods_compared.json":
            sections += _built(methods_compared_sections, p, p.parent, run)
    for p in found:
        if p.name == "fewshot.json":
            sections += _built(fewshot_sections, p, p.parent, run)
    for p in found:
        if p.name == "results.json" and _schema(p) == "medmerge.two_stage_lora/1":
            sections += _built(two_stage_sections, p, p.parent, run)
        if p.name == "decoding.json":
            sections += _built(decoding_sections, p, p.parent, run)
    return sections


def _schema(path: Path) -> Optional[str]:
    try:
        return json.loads(path.read_text()).get("schema")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


# --- rendering -----------------------------------------------------------------------------------------------------


def render_markdown(title: str, sections: list[Section], base: Path) -> str:
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for p in s.paragraphs:
            out += [p, ""]
        for head, rows in s.tables:
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "---|" * len(head))
            out += ["| " + " | ".join(r) + " |" for r in rows]
            out.append("")
        for png, caption in s.images:
            out += [f"![{caption}]({os.path.relpath(png, base)})", "", f"*{caption}*", ""]
        for caption, text in s.code:
            out += [f"{caption}:", "", "```", text.rstrip(), "```", ""]
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1d2330;line-height:1.45}
h1{border-bottom:2px solid #2c6e9b;padding-bottom:.3em}h2{margin-top:2em;color:#2c6e9b}
table{border-collapse:collapse;margin:1em 0;font-size:.85em;display:block;overflow-x:auto;max-width:100%}th,td{border:1px solid #cdd4de;padding:.3em .6em;text-align:left}
th{background:#eef3f8;max-width:11em;overflow-wrap:anywhere}tr:nth-child(even) td{background:#f8fafc}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #e2e6ec}figcaption{font-size:.85em;color:#555}
pre{background:#f4f6f8;padding:.8em;overflow-x:auto;font-size:.8em}code{background:#f4f6f8;padding:0 .2em}
.meta{color:#666;font-size:.85em}
"""


def _inline(text: str) -> str:
    """Escape, then `code` spans."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(title: str, sections: list[Section], meta: str) -> str:
    body = [f"<h1>{html.escape(title)}</h1>", f'<p class="meta">{html.escape(meta)}</p>']
    if sections:
        body.append("<ul>" + "".join(f'<li><a href="#s{i}">{html.escape(s.title)}</a></li>'
                                     for i, s in enumerate(sections)) + "</ul>")
    for i, s in enumerate(sections):
        body.append(f'<h2 id="s{i}">{html.escape(s.title)}</h2>')
        body += [f"<p>{_inline(p)}</p>" for p in s.paragraphs]
        for head, rows in s.tables:
            body.append("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"
                        + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                        + "</tbody></table>")
        for png, caption in s.images:
            data = base64.b64encode(png.read_bytes()).decode()
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        for caption, text in s.code:
            body.append(f"<p>{html.escape(caption)}:</p><pre>{html.escape(text)}</pre>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>" + html.escape(title)
            + f"</title><style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


MARK = "written by medmerge"  # in every report medmerge writes: --force replaces only those


def write_report(run: str | Path, *, title: Optional[str] = None, force: bool = False) -> dict:
    """Write RUN/report.html and RUN/report.md; return {"html", "md", "sections", "images"}."""
    run = Path(run).absolute()
    if not run.is_dir():
        raise InputError(f"{run} is not a folder; pass a run folder written by medmerge demo, sweep, fewshot or pipeline")
    sections = collect(run)
    if not sections:
        raise InputError(f"{run} holds nothing to report: no demo.json, sweep_summary.json, methods_compared.json, "
                         "fewshot.json, two-stage results.json or decoding.json under it")
    html_file, md_file = run / "report.html", run / "report.md"
    for f in (html_file, md_file):
        if f.is_symlink() or (f.exists() and not f.is_file()):
            raise OutputExistsError(f"{f} is a link or a folder, not a report; move it away first")
        if f.exists() and not force:
            raise OutputExistsError(f"{f} exists; pass --force to replace it")
        if f.exists() and MARK not in f.read_text(encoding="utf-8", errors="replace"):
            raise OutputExistsError(f"{f} was not written by medmerge report; --force replaces only medmerge's own "
                                    "reports: move it away or delete it yourself")
    title = title or f"medmerge report: {run.name}"
    meta = f"{run} - {MARK} on {datetime.now(timezone.utc).isoformat(timespec='seconds')}"
    for target, text in ((html_file, render_html(title, sections, meta)), (md_file, render_markdown(title, sections, run))):
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".medmerge-tmp", dir=run)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + (f"\n<!-- {MARK} -->\n" if target == md_file else ""))
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, target)
    return {"html": str(html_file), "md": str(md_file), "sections": [s.title for s in sections],
            "images": sum(len(s.images) for s in sections)}
