"""Python hooks for the MiniClinic lm-eval task YAMLs (`!function hooks.<name>`).

lm-eval loads this file by path; the code lives in `medmerge.miniclinic.evaltasks`.
Dataset hooks receive the task metadata, whose `data_dir` is a world's data/ folder.
"""

from medmerge.miniclinic.evaltasks import (  # noqa: F401
    agg_bleu,
    agg_inst_level_acc,
    gen_dataset,
    gen_results,
    if_dataset,
    if_results,
    mcq_dataset,
)
