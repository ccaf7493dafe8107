"""Python hooks for medmerge's lm-eval task YAMLs (`!function hooks.<name>`).

lm-eval loads this file by path; everything of substance lives in
`medmerge.evaluation` so it is importable and tested on its own. Dataset
hooks receive the task metadata (`data_dir`, set by `medmerge eval --data-dir`
or `lm_eval --metadata '{"data_dir": ...}'`; `MEDMERGE_DATA` otherwise) plus
the task's `dataset_kwargs`.
"""

from medmerge.evaluation.hooks import (  # noqa: F401
    agg_bleu,
    agg_composite,
    agg_inst_level_acc,
    ifeval_dataset,
    ifeval_process_results,
    medmcqa_dataset,
    medmcqa_prompt,
    medqa_dataset,
    medqa_prompt,
    meqsum_dataset,
    meqsum_results,
    mmlu_dataset,
    mts_dialog_dataset,
    mts_dialog_prompt,
    mts_dialog_results,
    pubmedqa_dataset,
    pubmedqa_prompt,
)
