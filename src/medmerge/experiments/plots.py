"""The experiments' plots, one function each, written with matplotlib's Agg backend (files only).

- `loss_curves`: training (and eval) loss of several `medmerge train` runs;
- `plot_decoding`: each metric per decoding setting (`medmerge analyze decoding`);
- `plot_pareto`, `plot_vs_t`: a sweep's merges, instruction following against clinical score, and
  both scores against the interpolation weight t;
- `plot_fewshot`: score against k for each starting point;
- `plot_training`: MedCare vs LoRA vs full fine-tuning, NLL per arm and stage 2's orthogonality penalty.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..runtime import pyplot
from ..training.trainer import read_log
from .sweep.points import other_params, t_value


def loss_curves(runs: dict[str, str | Path], path: str | Path, title: str = "training loss") -> Path:
    """One plot with every run's training loss (solid) and eval loss (dashed, where logged) against its step."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for i, (label, run) in enumerate(runs.items()):
        rows = read_log(run)
        color = f"C{i}"
        train = [r for r in rows if r.get("loss") is not None]
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], color=color, label=f"{label} (train)")
        ev = [r for r in rows if r.get("eval_loss") is not None]
        if ev:
            ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], color=color, linestyle="--",
                    label=f"{label} (eval)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_decoding(report: dict, path: Path) -> None:
    plt = pyplot()

    keys = sorted({k for r in report["settings"] for k in r["metrics"]})
    names = [r["setting"] for r in report["settings"]]
    cols = min(3, max(1, len(keys)))
    nrows = max(1, -(-len(keys) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        ax.bar(range(len(names)), [r["metrics"].get(key, 0.0) for r in report["settings"]], color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(key, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"decoding sensitivity: {Path(report['model']).name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _colors(methods: list[str]) -> dict[str, str]:
    import matplotlib  # deferred with pyplot(): only plotting steps pay for matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def plot_pareto(rows: list[dict], summary: dict, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 5))
    methods = sorted({r["method"] for r in rows if r["kind"] != "reference"})
    colors = _colors(methods)
    for m in methods:
        pts = [r for r in rows if r["method"] == m and r["kind"] != "reference" and r["if_score"] is not None
               and r.get("stopped_at_rung") is None]
        ax.scatter([r["clinical_score"] for r in pts], [r["if_score"] for r in pts], color=colors[m], label=m,
                   alpha=0.8, s=30)
    front = [r for r in rows if r.get("pareto")]
    front.sort(key=lambda r: r["clinical_score"])
    if front:
        ax.plot([r["clinical_score"] for r in front], [r["if_score"] for r in front], "k--", lw=1, label="Pareto front")
    for r in rows:
        if r["kind"] == "reference" and r["if_score"] is not None:
            ax.scatter([r["clinical_score"]], [r["if_score"]], marker="*", s=200, color="black", zorder=5)
            ax.annotate(r["label"], (r["clinical_score"], r["if_score"]), textcoords="offset points", xytext=(6, 6))
    thr = summary["select"].get("if_reference")
    if thr and summary["select"].get("if_retention_min") is not None:
        y = thr * summary["select"]["if_retention_min"] / 100
        ax.axhline(y, color="grey", lw=0.8, ls=":", label=f"IF >= {summary['select']['if_retention_min']:g}% of instruct")
    b = summary.get("best")
    if b:
        ax.scatter([b["clinical_score"]], [b["if_score"]], s=260, facecolors="none", edgecolors="red", lw=2,
                   label=f"best: {b['label']}", zorder=6)
    ax.set_xlabel("clinical composite (0-100)")
    ax.set_ylabel("instruction following (0-100)")
    ax.set_title("instruction following vs clinical: every merge")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def vs_t_series(rows: list[dict]) -> dict[tuple[str, str], list[tuple[float, float | None, float | None]]]:
    """A sweep's merges as curves against t: one series per (method, setting), the setting being every parameter
    but t, each a list of (t, IF, clinical) sorted by t. Points with a per-layer t, and points stopped early, are
    left out."""
    series: dict[tuple[str, str], list] = {}
    for r in rows:
        t = t_value(r)
        if r["kind"] == "reference" or t is None or r.get("stopped_at_rung") is not None:
            continue
        series.setdefault((r["method"], other_params(r)), []).append((t, r["if_score"], r["clinical_score"]))
    return {key: sorted(pts, key=lambda p: p[0]) for key, pts in sorted(series.items())}


def plot_vs_t(rows: list[dict], summary: dict, path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series = vs_t_series(rows)
    colors = _colors(sorted({m for m, _ in series}))
    styles = ("-", "--", ":", "-.")
    nth: dict[str, int] = {}
    for (m, rest), pts in series.items():
        i = nth[m] = nth.get(m, -1) + 1  # the method's colour; its settings by line style and marker
        for ax, col in ((axes[0], 1), (axes[1], 2)):
            xy = [(p[0], p[col]) for p in pts if p[col] is not None]
            if xy:
                ax.plot([x for x, _ in xy], [y for _, y in xy], ls=styles[i % len(styles)], marker="osd^v"[i % 5],
                        color=colors[m], label=f"{m} {rest}".strip())
    for ax, key, title in ((axes[0], "if_score", "instruction following"), (axes[1], "clinical_score", "clinical composite")):
        for role, ref in summary["references"].items():
            if ref[key] is not None:
                ax.axhline(ref[key], ls=":", lw=1, color="grey")
                ax.annotate(role, (0, ref[key]), textcoords="offset points", xytext=(2, 3), fontsize=8, color="grey")
        ax.set_xlabel(f"t (share of {summary['roles']['domain']}; {summary['roles']['general']} gets 1 - t)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:  # below both panels: settings labels are long
        fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.045 * math.ceil(len(labels) / 3) if handles else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fewshot(result: dict, path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "clinical_score", "clinical composite"), (axes[1], "if_score", "instruction following")):
        for name, s in result["starts"].items():
            pts = [(0, s[key])] + [(r["k"], r[key]) for r in result["runs"] if r["start"] == name]
            pts = [(k, v) for k, v in pts if v is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("symlog", linthresh=8)
        ks = [0] + result["k"]
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel("fine-tuning examples k (0 = the starting point)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    c = result.get("claim")
    if c:
        fig.suptitle(f"{c['model']}@{c['k']} vs {c['versus']}@{c['versus_k']}: "
                     + c.get("verdict", "holds" if c["holds"] else "does not hold" if c["holds"] is not None
                             else "undefined"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _train_runs(info: dict) -> list[tuple[str, str]]:
    """(label, run folder) of an arm's training runs, in order."""
    runs = []
    if "stage1" in info:
        runs.append(("stage 1", info["stage1"]["run"]))
    if "run" in info:
        runs.append(("stage 2" if "stage1" in info else "", info["run"]))
    return runs


def plot_training(arms: dict, path: Path) -> None:
    """Training NLL of every arm against its cumulative step, and stage 2's orthogonality penalty."""
    plt = pyplot()

    fig, (ax, axp) = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, (arm, info) in enumerate(a for a in arms.items() if a[0] not in ("start", "medcare_stage1")):
        offset = 0
        for label, run in _train_runs(info):
            rows = [r for r in read_log(Path(run) / "train_log.jsonl") if r.get("loss") is not None]
            if not rows:
                continue
            steps = [offset + r["step"] for r in rows]
            ax.plot(steps, [r.get("nll", r["loss"]) for r in rows], color=f"C{i}",
                    linestyle="-" if label != "stage 1" else ":", label=f"{arm} {label}".strip())
            if any("orth_penalty" in r for r in rows):
                axp.plot(steps, [r["orth_penalty"] for r in rows], color=f"C{i}", label=arm)
            offset = steps[-1]
    ax.set(xlabel="step", ylabel="training NLL", title="training loss (NLL) per arm")
    axp.set(xlabel="step", ylabel="sum |A_KA A_AM^T|_1", title="stage 2: orthogonality penalty", yscale="log")
    for a in (ax, axp):
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
