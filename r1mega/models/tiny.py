"""The architectures of r1mega's embedded tiny models, small enough to train on 2 CPU cores.

* :func:`tiny_moe_config`, the default (the teacher of the R1 stages): a Qwen3-MoE.
  Mixture-of-experts on purpose, so that the default run exercises routing, expert parallelism
  and router replay. The benchmarks measure on a randomly initialised model of this shape.
* :func:`tiny_dense_config`, the distillation student: a smaller dense Llama-3 (or Qwen2), the
  kind of model DeepSeek-R1 distilled its reasoning into.
"""

from __future__ import annotations


def tiny_moe_config(vocab_size: int = 512, *, eos_token_id: int = 2, pad_token_id: int = 0) -> dict:
    """A Hugging Face config.json (as a dict) of the tiny default: 4 layers, hidden 128, 8 experts top-2."""
    return {
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": vocab_size,
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "moe_intermediate_size": 128, "num_experts": 8,
        "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "max_position_embeddings": 1024, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "tie_word_embeddings": True, "initializer_range": 0.02, "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id, "bos_token_id": None, "dtype": "float32",
    }


DENSE_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def tiny_dense_config(vocab_size: int = 512, *, arch: str = "llama", num_layers: int = 3, hidden_size: int = 96,
                      intermediate_size: int = 256, num_heads: int = 4, num_kv_heads: int = 2,
                      eos_token_id: int = 2, pad_token_id: int = 0) -> dict:
    """A Hugging Face config.json (as a dict) of the tiny dense student: by default a Llama-3
    architecture of 3 layers, hidden 96, SwiGLU 256, 4 heads sharing 2 key/value heads (head dim
    24), tied embeddings, no biases, plain RoPE; ``arch="qwen2"`` the same sizes as a Qwen2 (which
    has q/k/v biases). With the embedded tokenizer (396 tokens): 343k parameters, a fifth of the
    MoE's 1.83M and about half of its ~0.64M active per token."""
    if arch not in DENSE_ARCHS:
        raise ValueError(f"tiny_dense_config: arch {arch!r} is not one of {', '.join(DENSE_ARCHS)}")
    if hidden_size % num_heads or num_heads % num_kv_heads or (hidden_size // num_heads) % 2:
        raise ValueError(f"tiny_dense_config: hidden {hidden_size}, heads {num_heads}, kv heads {num_kv_heads}: "
                         "heads must divide hidden into an even head dim, kv heads must divide heads")
    cfg = {
        "model_type": arch, "architectures": [DENSE_ARCHS[arch]], "vocab_size": vocab_size,
        "hidden_size": hidden_size, "intermediate_size": intermediate_size, "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": 1024, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "tie_word_embeddings": True, "initializer_range": 0.02, "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id, "bos_token_id": None, "dtype": "float32",
    }
    if arch == "llama":
        cfg.update(head_dim=hidden_size // num_heads, attention_bias=False, mlp_bias=False)
    return cfg
