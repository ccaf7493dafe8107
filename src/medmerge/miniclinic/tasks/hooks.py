"""Python hooks for the MiniClinic lm-eval task YAMLs (`!function hooks.<name>`).

lm-eval loads this file by path; the code lives in `medmerge.miniclinic.evaltasks` (and, for
mm_miniclinic_align, in `medmerge.miniclinic.align`).
Dataset hooks receive the task metadata, whose `data_dir` is a world's data/ folder.
"""

from medmerge.miniclinic.align import eval_dataset as align_dataset  # noqa: F401
from medmerge.miniclinic.evaltasks import (  # noqa: F401
    agg_bleu,
    agg_inst_level_acc,
    gen_dataset,
    gen_results,
    if_dataset,
    if_results,
    mcq_dataset,
)
