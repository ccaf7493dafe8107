"""Named chat templates (Jinja, as transformers renders them: trim_blocks, lstrip_blocks), shared by training
(`chat_template:` of a training config) and merging (`chat_template:` of a merge config).

`chatml`, `llama3`, `mistral`, `alpaca` and `exaone` follow those families' published formats (the names
mergekit 0.1.5 ships); `plain` is medmerge's template-free format for models without one.
"""

from __future__ import annotations

NAMED_TEMPLATES = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "plain": (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
        "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
    ),
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set turns = messages[1:] %}{% else %}{% set turns = messages %}{% endif %}{{ bos_token }}"
        "{% for m in turns %}{% if m['role'] == 'user' %}"
        "{% if loop.first and system is defined %}{{ ' [INST] ' + system + '\n\n' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' [INST] ' + m['content'] + ' [/INST]' }}{% endif %}"
        "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "alpaca": (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] | trim }}\n\n"
        "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] | trim }}\n\n"
        "{% elif m['role'] == 'assistant' %}### Response:\n{{ m['content'] | trim }}{{ eos_token }}\n\n"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}### Response:\n{% endif %}"
    ),
    "exaone": (
        "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}[|system|][|endofturn|]\n{% endif %}"
        "[|{{ m['role'] }}|]{{ m['content'] }}{% if m['role'] == 'user' %}\n{% else %}[|endofturn|]\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}[|assistant|]{% endif %}"
    ),
}
