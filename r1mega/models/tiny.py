"""The architecture of r1mega's embedded tiny default: a Qwen3-MoE small enough to train on 2 CPU cores.

Mixture-of-experts on purpose, so that the default run exercises routing, expert parallelism and
router replay. The benchmarks measure on a randomly initialised model of this shape.
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
