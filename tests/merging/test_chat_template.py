"""`chat_template:` in merge configs, and the check that generation still stops after a merge."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import medmerge
from medmerge.errors import ConfigError
from medmerge.io.chat_templates import NAMED_TEMPLATES
from medmerge.merging.templates import stopping_problems

CONVERSATIONS = [
    [{"role": "user", "content": "Summarize the note."}],
    [{"role": "system", "content": "You are careful."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "List two drugs."}],
]


def _cfg(f, **extra):
    return {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": f["a"], "parameters": {"weight": 0.5}}, {"model": f["b"], "parameters": {"weight": 0.5}}], **extra}


@pytest.fixture()
def fam(llama_family, tmp_path):
    """Copies of the family's a, b, c (their tokenizer files are edited by some tests)."""
    out = {}
    for k in ("a", "b", "c"):
        shutil.copytree(llama_family[k], tmp_path / k)
        out[k] = str(tmp_path / k)
    return out


def _set_template(folder: str, template: str) -> None:
    p = Path(folder) / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    cfg["chat_template"] = template
    p.write_text(json.dumps(cfg))


@pytest.mark.parametrize("value", ["chatml", "llama3", "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
                                   "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"])
def test_a_named_or_jinja_template_becomes_the_outputs(fam, tmp_path, value):
    from transformers import AutoTokenizer

    result = medmerge.merge(_cfg(fam, chat_template=value), tmp_path / "out", progress=False)
    template = NAMED_TEMPLATES.get(value, value)
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == template
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == template
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tok.chat_template == template
    rendered = tok.apply_chat_template(CONVERSATIONS[1], tokenize=False, add_generation_prompt=True)
    if value == "chatml":
        assert rendered == ("<|im_start|>system\nYou are careful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                            "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nList two drugs.<|im_end|>\n"
                            "<|im_start|>assistant\n")
    if value == "llama3":  # Meta's format: BOS once, no newline after <|eot_id|>
        assert rendered.startswith(f"{tok.bos_token}<|start_header_id|>system<|end_header_id|>\n\nYou are careful."
                                   "<|eot_id|><|start_header_id|>user")
    record = (tmp_path / "out" / "medmerge.yml").read_text()
    assert "chat_template:" in record
    assert not any("closes turns" in n for n in result.notes)  # the tiny tokenizer has no turn tokens


def test_auto_takes_the_template_most_inputs_share(fam, tmp_path):
    _set_template(fam["a"], "{{ 'A' }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    _set_template(fam["b"], "{{ 'B' }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    _set_template(fam["c"], "{{ 'B' }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    cfg = {**_cfg(fam, chat_template="auto")}
    cfg["models"].append({"model": fam["c"], "parameters": {"weight": 0.5}})
    medmerge.merge(cfg, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "chat_template.jinja").read_text().startswith("{{ 'B' }}")


@pytest.mark.parametrize("value, message", [
    ("vicuna", "neither `auto`, a template name"),
    ("{% for m in messages %}{{ m['content'] }}", "does not compile"),
])
def test_a_bad_template_is_refused_before_any_tensor_is_read(fam, tmp_path, value, message):
    with pytest.raises(ConfigError, match=message):
        medmerge.merge(_cfg(fam, chat_template=value), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["chatml", "mistral"])
def test_named_templates_render_as_mergekits_do(name):
    """mergekit 0.1.5 ships these names as Jinja files (test-only oracle): rendered by transformers' engine
    (trim_blocks, lstrip_blocks) the conversations come out the same. mergekit's llama3 and exaone files leave
    the whitespace of their own indentation in the output (a newline after every Llama 3 turn, spaces before
    EXAONE's); medmerge's follow the published formats instead."""
    pytest.importorskip("mergekit")
    from importlib.resources import files

    from mergekit._data import chat_templates
    from transformers.utils.chat_template_utils import render_jinja_template

    theirs = files(chat_templates).joinpath(f"{name}.jinja").read_text()
    for convo in CONVERSATIONS:
        for gen in (False, True):
            kw = dict(add_generation_prompt=gen, bos_token="<s>", eos_token="</s>")
            ours = render_jinja_template([convo], chat_template=NAMED_TEMPLATES[name], **kw)[0][0]
            ref = render_jinja_template([convo], chat_template=theirs, **kw)[0][0]
            assert ours.strip() == ref.strip(), (name, gen, ours, ref)


def _folder(root: Path, eos: str, eos_ids, special: dict[str, int], template: str | None = None) -> Path:
    root.mkdir()
    (root / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos, **({"chat_template": template}
                                                                                  if template else {})}))
    (root / "tokenizer.json").write_text(json.dumps({"added_tokens": [
        {"id": i, "content": t, "special": True} for t, i in special.items()]}))
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}))
    return root


def test_what_would_keep_generation_from_stopping_is_said(tmp_path):
    special = {"</s>": 2, "<|im_end|>": 7}
    base = _folder(tmp_path / "base", "</s>", 2, special)
    out = _folder(tmp_path / "out", "</s>", 2, special, NAMED_TEMPLATES["chatml"])
    [problem] = stopping_problems(out, base)
    assert "closes turns with <|im_end|> (id 7)" in problem and "add that id to eos_token_id" in problem
    fixed = _folder(tmp_path / "fixed", "</s>", [2, 7], special, NAMED_TEMPLATES["chatml"])
    problems = stopping_problems(fixed, base)
    assert problems == ["generation_config.json's eos_token_id is [2, 7], the base's [2]"]
    assert stopping_problems(fixed, fixed) == []
    other = _folder(tmp_path / "other", "<|im_end|>", 7, special)
    assert any("EOS token is '<|im_end|>', the base's '</s>'" in p for p in stopping_problems(other, base))
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**cfg, "pad_token": "<|im_end|>"}))
    assert any("pad token is '<|im_end|>'" in p for p in stopping_problems(other, base))
