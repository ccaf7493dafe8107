"""`chat_template:` in a merge config: the output tokenizer's template, and whether generation still stops.

A value is `auto` (the template most of the inputs share, as mergekit 0.1.5 picks it), a name
(io.chat_templates: chatml, llama3, mistral, alpaca, exaone, plain) or a Jinja string. It is checked with the
config (a Jinja string must compile); after the merge it is written as the output tokenizer's template
(chat_template.jinja and tokenizer_config.json's `chat_template`).

Whatever the template, the output is checked for what makes engines (vLLM, HF generate) never stop: its EOS
token differs from the base's, or the template closes assistant turns with a special token (<|im_end|>,
<|eot_id|>, ...) that generation_config.json's eos_token_id does not hold. Both are said, with the fix.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Optional

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ConfigError
from ..io.chat_templates import NAMED_TEMPLATES

END_MARKERS = ("end", "eot", "eos", "</s>")  # special tokens that close a turn contain one of these


def check_chat_template(value: Optional[str]) -> None:
    """A config's `chat_template`: None, `auto`, a known name, or a Jinja string that compiles."""
    if value is None or value == "auto" or value in NAMED_TEMPLATES:
        return
    if "{" not in value:
        raise ConfigError(f"chat_template {value!r} is neither `auto`, a template name ({', '.join(NAMED_TEMPLATES)}) "
                          "nor a Jinja template")
    try:
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(value)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"chat_template: the Jinja template does not compile (line {e.lineno}: {e.message})") from None


def model_template(folder: Path) -> Optional[str]:
    """A model folder's chat template (chat_template.jinja, else tokenizer_config.json's), or None."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        template = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if isinstance(template, dict):
            template = template.get("default")
        return template or None
    return None


def resolve_template(value: str, inputs: list[Path]) -> Optional[str]:
    """The template text `value` stands for; `auto`: the inputs' most common template (None if none has one)."""
    if value == "auto":
        found = [t.strip() for t in (model_template(p) for p in inputs) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    return NAMED_TEMPLATES.get(value, value)


def write_template(folder: Path, template: str) -> None:
    """Make `template` the output tokenizer's: chat_template.jinja (what transformers reads first) and
    tokenizer_config.json's key, so that tools reading either see the same text."""
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _special_tokens(folder: Path) -> dict[str, int]:
    path = folder / "tokenizer.json"
    if not path.is_file():
        return {}
    added = json.loads(path.read_text(encoding="utf-8")).get("added_tokens", [])
    return {t["content"]: t["id"] for t in added if t.get("special")}


def _special(folder: Path, kind: str) -> tuple[Optional[str], list[int]]:
    """(the tokenizer's `kind` token (eos, pad), generation_config.json's `kind`_token_id as a list)."""
    token = None
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        token = json.loads(cfg.read_text(encoding="utf-8")).get(f"{kind}_token")
        token = token.get("content") if isinstance(token, dict) else token
    ids: list[int] = []
    gen = folder / "generation_config.json"
    if gen.is_file():
        value = json.loads(gen.read_text(encoding="utf-8")).get(f"{kind}_token_id")
        ids = [value] if isinstance(value, int) else list(value or [])
    return token, ids



def stopping_problems(out: Path, base: Optional[Path]) -> list[str]:
    """What would keep generation from stopping with OUT's tokenizer, template and generation config."""
    problems = []
    token, ids = _special(out, "eos")
    if base is not None:
        base_token, base_ids = _special(base, "eos")
        if base_token != token:
            problems.append(f"the output's EOS token is {token!r}, the base's {base_token!r}: check that generation "
                            "stops (generation_config.json's eos_token_id)")
        if sorted(base_ids) != sorted(ids):
            problems.append(f"generation_config.json's eos_token_id is {ids}, the base's {base_ids}")
        pad, pad_ids = _special(out, "pad")
        base_pad, base_pad_ids = _special(base, "pad")
        if (pad, sorted(pad_ids)) != (base_pad, sorted(base_pad_ids)):
            problems.append(f"the output's pad token is {pad!r} (generation_config pad_token_id {pad_ids}), the "
                            f"base's {base_pad!r} ({base_pad_ids}): batched generation pads with it")
    template = model_template(out)
    special = _special_tokens(out)
    if template and ids:
        enders = [t for t in special if t in template and any(m in t.lower() for m in END_MARKERS)]
        missing = [t for t in enders if special[t] not in ids]
        if enders and len(missing) == len(enders):
            shown = ", ".join(f"{t} (id {special[t]})" for t in missing)
            problems.append(f"the chat template closes turns with {shown}, which generation_config.json's "
                            f"eos_token_id {ids} does not hold: generation would not stop at the end of a turn; add "
                            "that id to eos_token_id")
    return problems
