"""The Typer application and its command groups; the commands register themselves on them (one file per group)."""

from __future__ import annotations

import typer

from .common import group

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Merge and verify clinical LLMs in weight space.")
miniclinic_app = group(app, "miniclinic", "The embedded synthetic clinical world.")
adapters_app = group(app, "adapters", "LoRA adapters: exact weighted merges.")
pipeline_app = group(app, "pipeline", "Multi-step recipes.")
analyze_app = group(app, "analyze", "Decoding sensitivity, reasoning leakage, loss curves.")
medcare_app = group(app, "medcare", "MedCare: knowledge aggregation, then orthogonal alignment.")
