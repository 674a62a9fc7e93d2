"""Tiny random Hugging Face models for the model tests: built with transformers, saved with
save_pretrained into a directory (no download), fp32.

Sizes keep every layout the tests use valid: vocabulary, heads, key/value heads, experts and the
MLA kv_a projection width are divisible by 2. Routing is made decisive (no near-ties between
experts) by a larger init scale for the routers and a random DeepSeek-V3 expert bias, so that the
megatron and transformers routers pick the same experts.
"""

from __future__ import annotations

from pathlib import Path

ARCHS = ("deepseek_v3", "qwen3_moe", "qwen2", "llama")

_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=4,
               max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.05)

CONFIGS = {
    # MLA (no q LoRA), sigmoid router + expert bias, 4 groups of 2 choose 2 groups, top-4
    # (top-4 // 2 groups = top-2 group scoring, as transformers does), 1 shared expert,
    # first layer dense.
    "deepseek_v3": dict(_COMMON, num_hidden_layers=3, num_key_value_heads=4, moe_intermediate_size=32,
                        n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2,
                        n_shared_experts=1, routed_scaling_factor=2.5, first_k_dense_replace=1,
                        q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                        v_head_dim=16, norm_topk_prob=True),
    # softmax top-2 of 8, renormalised; q/k norm; head_dim != hidden/heads; layer 0 dense.
    "qwen3_moe": dict(_COMMON, num_hidden_layers=3, num_key_value_heads=2, head_dim=24,
                      moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[0]),
    # q/k/v biases, tied embeddings, GQA.
    "qwen2": dict(_COMMON, num_hidden_layers=2, num_key_value_heads=2, tie_word_embeddings=True),
    # Llama-3.1 rope scaling, GQA.
    "llama": dict(_COMMON, num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=16384,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}),
}

# A DeepSeek-V3 variant with q LoRA and YaRN rope scaling (the real models' setting).
DEEPSEEK_YARN = dict(CONFIGS["deepseek_v3"], q_lora_rank=24, num_hidden_layers=2,
                     rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                      "original_max_position_embeddings": 64, "beta_fast": 32,
                                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})


def hf_classes(arch: str):
    import transformers

    names = {"deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
             "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
             "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
             "llama": ("LlamaConfig", "LlamaForCausalLM")}[arch]
    return getattr(transformers, names[0]), getattr(transformers, names[1])


def make_tiny_hf(arch: str, out_dir: str | Path, *, seed: int = 0, config: dict | None = None,
                 max_shard_size: str | None = None) -> Path:
    """Build a random tiny `arch` model (fp32) and save_pretrained it into `out_dir`."""
    import torch

    config_cls, model_cls = hf_classes(arch)
    torch.manual_seed(seed)
    cfg = config_cls(**(config or CONFIGS[arch]))
    model = model_cls(cfg).float().eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "e_score_correction_bias"):  # a nonzero bias so that it matters
                module.e_score_correction_bias.uniform_(-0.05, 0.05)
            if name.endswith("mlp.gate") and hasattr(module, "weight"):  # decisive routing
                module.weight.normal_(0.0, 0.5)
    out_dir = Path(out_dir)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    return out_dir


def load_hf_model(path: str | Path):
    """The transformers model saved in `path`, fp32, eager attention, eval mode."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype="float32", attn_implementation="eager")
    return model.eval()


def sample_ids(vocab_size: int, batch: int = 2, seq: int = 12, seed: int = 1):
    import torch

    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


FIXTURES = {**{arch: (arch, None) for arch in ARCHS}, "deepseek_v3_yarn": ("deepseek_v3", DEEPSEEK_YARN)}

# Sized for vLLM's CPU kernels (the vLLM lane): attention head dims 32, and multi-latent attention
# with kv_lora_rank + rope head = 512 + 64, the one size vLLM's CPU MLA kernel compiles.
VLLM_CONFIGS = {
    "deepseek_v3": dict(CONFIGS["deepseek_v3"], kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32,
                        v_head_dim=32),
    "qwen3_moe": dict(CONFIGS["qwen3_moe"], head_dim=32),
    "qwen2": dict(CONFIGS["qwen2"], hidden_size=128),
}
SHARDED = {"qwen3_moe": "100KB"}  # saved as several shards with an index
BF16 = "deepseek_v3_bf16"  # deepseek_v3 in bf16 with the expert bias kept in fp32, as transformers saves it


def build_fixture_set(root: str | Path) -> Path:
    """Every fixture model under `root/<name>/` and its transformers logits in `root/<name>.ref.pt`.

    Idempotent: a completed set (marked by `root/.done`) is reused.
    """
    import torch

    root = Path(root)
    if (root / ".done").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    for seed, (name, (arch, config)) in enumerate(FIXTURES.items()):
        path = make_tiny_hf(arch, root / name, seed=seed, config=config, max_shard_size=SHARDED.get(name))
        model = load_hf_model(path)
        ids = sample_ids(model.config.vocab_size, seed=seed)
        with torch.no_grad():
            logits = model(ids).logits.float()
        torch.save({"ids": ids, "logits": logits}, root / f"{name}.ref.pt")
    _make_bf16(root / "deepseek_v3", root / BF16)
    (root / ".done").touch()
    return root


def build_vllm_fixture_set(root: str | Path) -> Path:
    """The :data:`VLLM_CONFIGS` models under `root/<arch>/` (idempotent, like build_fixture_set)."""
    root = Path(root)
    if (root / ".done").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    for seed, (arch, config) in enumerate(VLLM_CONFIGS.items()):
        make_tiny_hf(arch, root / arch, seed=seed, config=config)
    (root / ".done").touch()
    return root


def _make_bf16(src: Path, dst: Path) -> None:
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    save_file({name: t if name.endswith("e_score_correction_bias") else t.to(torch.bfloat16)
               for name, t in tensors.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}, indent=2) + "\n")
