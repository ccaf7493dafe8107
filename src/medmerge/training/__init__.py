"""`medmerge train`: one stage of continued pre-training (pt) or instruction tuning (sft), full or LoRA.

config (TrainConfig, YAML + overrides) -> data (records, k-shot subsets, tokenisation) -> trainer (HF Trainer).
"""
