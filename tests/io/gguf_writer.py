"""Write a tiny GGUF file from a tiny random Llama, as llama.cpp's convert_hf_to_gguf.py would (test helper).

A byte-level BPE tokenizer trained here on a few sentences, a chat template, q/k weights permuted into
llama.cpp's rotary layout, 2-D weights quantized (Q8_0 or Q4_1, gguf's own numpy quantizers), norms in F32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = ["What is hypertension? High blood pressure, a risk for stroke and heart disease.",
        "Summarize the patient's history: chest pain for two days, smoker, diabetes.",
        "Write a haiku about the heart. The patient denies fever and cough."] * 20


def bpe(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    return tok


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order (its convert script's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, *, quant: str = "Q8_0", arch: str = "llama", seed: int = 0,
                    tie: bool = True) -> tuple[Path, dict]:
    """-> (the .gguf file, the float32 state dict it was quantized from)."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = bpe()
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    n_vocab = 320 if len(tokens) <= 320 else len(tokens)
    tokens += [f"[PAD{i}]" for i in range(n_vocab - len(tokens))]
    import json
    merges = [" ".join(m) if isinstance(m, (list, tuple)) else m
              for m in json.loads(tok.to_str())["model"]["merges"]]
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=n_vocab, max_position_embeddings=256,
                      tie_word_embeddings=tie, rms_norm_eps=1e-5, rope_theta=10000.0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape) * 0.1)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-medmerge-test")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "Q8_0" else gguf.LlamaFileType.MOSTLY_Q4_1)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|im_end|>"))
    w.add_unk_token_id(tokens.index("<|endoftext|>"))
    w.add_chat_template(CHATML)
    qtype = getattr(gguf.GGMLQuantizationType, quant)

    def put(name: str, t: torch.Tensor, quantize: bool = True):
        data = t.float().numpy().astype(np.float32)
        if quantize and data.ndim == 2:
            q = gguf.quants.quantize(data, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
        else:
            w.add_tensor(name, data)

    put("token_embd.weight", state["model.embed_tokens.weight"])
    if not tie:
        put("output.weight", state["lm_head.weight"])
    put("output_norm.weight", state["model.norm.weight"], False)
    h, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_q.weight", permute(state[p + "self_attn.q_proj.weight"], h))
        put(f"blk.{i}.attn_k.weight", permute(state[p + "self_attn.k_proj.weight"], kv))
        put(f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_gate.weight", state[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", state[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", state[p + "mlp.down_proj.weight"])
        put(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"], False)
        put(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"], False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, state
