"""MiniClinic: a deterministic synthetic clinical world (data, tokenizer, evaluation tasks).

`medmerge.miniclinic.world` generates it; nothing heavy is imported here.
"""
