"""The world's tokenizer: word level, trained on the world's own text with the `tokenizers` library.

Pre-tokenization is GPT-2's byte-level split (words, runs of punctuation, newlines;
a word keeps the space before it, as `Ġword`), so decoding gives back the exact
text: "P.S.", "<<title>>", bullet lines and JSON survive a round trip, which the
IFEval checkers need. The vocabulary is every such piece in the training text,
plus every word of the world in lower, Capitalised and UPPER case after a space,
so case constraints never fall back to `<unk>` (forms without the space, at the
start of a line, are those the training text has).

Special tokens: <unk> 0, <s> 1, </s> 2, <pad> 3, <|system|> 4, <|user|> 5,
<|assistant|> 6. Encoding adds <s> in front (like Llama's tokenizer); the chat
template writes its own <s>, and lm-eval and `apply_chat_template` then add no
second one. `tokenizers` and transformers are imported by the functions that train and
wrap the tokenizer (deferred on purpose: the world's data generation does not need them).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Iterator

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>")
UNK, BOS, EOS, PAD = SPECIAL_TOKENS[:4]
SYSTEM, USER, ASSISTANT = SPECIAL_TOKENS[4:]

# A user turn, an assistant turn ended by </s>; add_generation_prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def chat_prompt(prompt: str, system: str | None = None) -> str:
    """What CHAT_TEMPLATE renders for one user turn with add_generation_prompt=True."""
    head = f"{BOS}" + (f"{SYSTEM}\n{system}\n" if system else "")
    return f"{head}{USER}\n{prompt}\n{ASSISTANT}\n"


def chat_example(prompt: str, response: str) -> str:
    """A full single-turn conversation as CHAT_TEMPLATE renders it: chat_prompt(prompt) + response + </s>."""
    return chat_prompt(prompt) + response + EOS


def _pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def pieces(text: str) -> list[str]:
    """The pre-tokenized pieces of `text` (one token each when all are in the vocabulary)."""
    return [p for p, _ in _pre_tokenizer().pre_tokenize_str(text)]


def count_pieces(text: str) -> int:
    return len(_PRE.pre_tokenize_str(text))


# GPT-2's split (what ByteLevel(use_regex=True) applies) for ASCII text, to count tokens fast
_PIECE_RE = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""")


def count_tokens(texts: list[str]) -> int:
    """Tokens in `texts` (no special tokens) when every piece is in the vocabulary, as in the world's text.

    Counts the pieces of the documents joined by newlines, less the newlines.
    """
    if not texts:
        return 0
    joined = "\n".join(texts)
    if not joined.isascii():
        return sum(count_pieces(t) for t in texts)
    return len(_PIECE_RE.findall(joined)) - (len(texts) - 1)


_PRE = _pre_tokenizer()


def case_forms(words: Iterable[str]) -> Iterator[str]:
    """Each word in lower, Capitalised and UPPER case, after a space (`Ġword`, `ĠWord`, `ĠWORD`)."""
    for w in words:
        for form in sorted({w.lower(), w.lower()[:1].upper() + w.lower()[1:], w.upper()}):
            yield " " + form


def words_in(texts: Iterable[str]) -> list[str]:
    found: set[str] = set()
    for t in texts:
        found.update(w.lower() for w in re.findall(r"[A-Za-z]+", t))
    return sorted(found)


def train(texts: Iterable[str], words: Iterable[str]):
    """A `tokenizers.Tokenizer` (WordLevel) trained on `texts`, with every case form of `words`."""
    from tokenizers import Tokenizer, decoders, models, processors, trainers

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.WordLevelTrainer(vocab_size=1_000_000, min_frequency=1, show_progress=False,
                                        special_tokens=list(SPECIAL_TOKENS))

    def stream():
        yield from texts
        yield from case_forms(words)

    tok.train_from_iterator(stream(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))],
    )
    return tok


def wrap(tok, model_max_length: int = 1024):
    """A transformers PreTrainedTokenizerFast with the special tokens and the chat template."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        extra_special_tokens=[SYSTEM, USER, ASSISTANT], clean_up_tokenization_spaces=False,
        model_max_length=model_max_length, padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save(tok, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    wrap(tok).save_pretrained(str(out))
    return out


def oov(tok, text: str) -> list[str]:
    """Pieces of `text` that the tokenizer maps to <unk>."""
    unk = tok.token_to_id(UNK)
    enc = tok.encode(text, add_special_tokens=False)
    return [text[a:b] for i, (a, b) in zip(enc.ids, enc.offsets) if i == unk]
