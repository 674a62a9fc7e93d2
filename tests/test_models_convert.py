"""Hugging Face configs -> ModelDesc (and refusals), checkpoint checks that name the bad tensor, the
ParallelConfig world-size check, and the `r1mega convert` command (round trip bit for bit)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from r1mega.cli import main
from r1mega.config import ConfigError
from r1mega.models import UnsupportedModelError, describe_hf_config, describe_hf_model
from r1mega.models.errors import CheckpointError
from r1mega.models.hf_checkpoint import check_hf_checkpoint
from r1mega.models.hf_mapping import expected_hf_tensors
from r1mega.parallel import ParallelConfig
from tests.models_fixtures import CONFIGS
from tests.torchrun import run_torchrun
from tests.workers._models_common import same_tensors


# ---- descriptions ---------------------------------------------------------------------------
def test_describes_each_fixture_family(tiny_models):
    ds = describe_hf_model(tiny_models / "deepseek_v3")
    assert ds.arch == "deepseek_v3" and ds.mla.kv_lora_rank == 16 and ds.mla.q_lora_rank is None
    assert ds.moe.layers == (False, True, True) and ds.moe.score_function == "sigmoid"
    assert ds.moe.expert_bias and (ds.moe.num_groups, ds.moe.group_topk) == (4, 2)
    assert ds.moe.scaling_factor == 2.5 and ds.moe.shared_ffn_hidden_size == 32 and ds.moe.router_fp32
    yarn = describe_hf_model(tiny_models / "deepseek_v3_yarn")
    assert yarn.rope.kind == "yarn" and yarn.rope.factor == 4.0 and yarn.mla.q_lora_rank == 24
    qwen3 = describe_hf_model(tiny_models / "qwen3_moe")
    assert qwen3.qk_norm and qwen3.head_dim == 24 and qwen3.moe.layers == (False, True, True)
    assert qwen3.moe.score_function == "softmax" and not qwen3.moe.pre_softmax  # norm_topk_prob
    qwen2 = describe_hf_model(tiny_models / "qwen2")
    assert qwen2.qkv_bias and qwen2.tie_embeddings and qwen2.moe is None
    llama = describe_hf_model(tiny_models / "llama")
    assert llama.rope.kind == "llama3" and llama.rope.factor == 8.0 and not llama.qkv_bias


def test_describes_real_configs_in_their_own_key_styles():
    # DeepSeek-V3 as published (minus its fp8 quantization_config), older rope_scaling keys.
    ds = dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
              moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
              num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5,
              kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
              topk_method="noaux_tc", n_group=8, topk_group=4, num_experts_per_tok=8, moe_layer_freq=1,
              first_k_dense_replace=3, norm_topk_prob=True, scoring_func="sigmoid", hidden_act="silu",
              max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000, torch_dtype="bfloat16",
              num_nextn_predict_layers=1, tie_word_embeddings=False,
              rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                            "original_max_position_embeddings": 4096, "type": "yarn"})
    desc = describe_hf_config(ds)
    assert desc.dtype == "bfloat16" and desc.rope.kind == "yarn" and desc.rope.factor == 40
    assert sum(desc.moe.layers) == 58 and desc.moe.num_groups == 8
    assert len(expected_hf_tensors(desc)) == 3 + 58 * (2 + 256 * 3 + 3) + 3 * 3 + 61 * 9
    with pytest.raises(UnsupportedModelError, match="quantization_config"):
        describe_hf_config({**ds, "quantization_config": {"quant_method": "fp8"}})
    # Qwen2.5-0.5B style: top-level rope_theta, tied embeddings.
    qwen = describe_hf_config(dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                   num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                   rope_theta=1000000.0, tie_word_embeddings=True, torch_dtype="bfloat16",
                                   use_sliding_window=False, max_window_layers=21))
    assert qwen.rope.theta == 1e6 and qwen.tie_embeddings and qwen.head_dim == 64
    # Llama-3.1 style rope_scaling.
    llama = describe_hf_config(dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                    rope_theta=500000.0, rope_scaling={"factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                    "rope_type": "llama3"}))
    assert llama.rope.kind == "llama3"


@pytest.mark.parametrize("arch, change, named", [
    ("deepseek_v3", {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}, "'mixtral'"),
    ("deepseek_v3", {"model_type": None}, "model_type None"),
    ("deepseek_v3", {"rope_interleave": False}, "rope_interleave=False"),
    ("deepseek_v3", {"topk_group": 1}, "topk_group=1"),
    ("deepseek_v3", {"scoring_func": "softmax"}, "scoring_func='softmax'"),
    ("deepseek_v3", {"moe_layer_freq": 2}, "moe_layer_freq=2"),
    ("deepseek_v3", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
     "rope_type='dynamic'"),
    ("deepseek_v3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                         "original_max_position_embeddings": 64, "mscale_all_dim": 1.0}},
     "rope_parameters.mscale=None"),
    ("deepseek_v3", {"num_experts_per_tok": 1, "n_group": 1, "topk_group": 1}, "num_experts_per_tok=1"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window=True"),
    ("qwen2", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 2.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
     "low_freq_factor"),
    ("llama", {"attention_bias": True}, "attention_bias=True"),
    ("qwen3_moe", {"num_attention_heads": None}, "'num_attention_heads' is missing"),
])
def test_refuses_what_megatron_would_not_reproduce_by_name(arch, change, named):
    cfg = {"model_type": arch, **CONFIGS[arch], **change}
    cfg = {k: v for k, v in cfg.items() if v is not None or k == "model_type"}
    with pytest.raises(UnsupportedModelError) as err:
        describe_hf_config(cfg)
    assert named in str(err.value) and "\n" not in str(err.value)


# ---- checkpoint checks ----------------------------------------------------------------------
def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_check_accepts_fixtures_single_and_sharded(tiny_models):
    for name in ("qwen2", "qwen3_moe"):
        desc = describe_hf_model(tiny_models / name)
        tensors, ignored = check_hf_checkpoint(tiny_models / name, desc)
        assert set(tensors) == set(expected_hf_tensors(desc)) and not ignored
    assert (tiny_models / "qwen3_moe" / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), ["missing tensor 'model.layers.1.mlp.up_proj.weight'"]),
    (lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}),
     ["unexpected tensor 'model.layers.0.mlp.extra.weight'", "model.safetensors"]),
    (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}),
     ["tensor 'model.layers.0.self_attn.k_proj.weight'", "shape [16, 64], expected [32, 64]"]),
])
def test_broken_directories_are_refused_naming_the_tensor(tiny_models, tmp_path, edit, words):
    broken = _copy(tiny_models / "qwen2", tmp_path / "broken")
    _rewrite(broken, edit)
    with pytest.raises(CheckpointError) as err:
        check_hf_checkpoint(broken, describe_hf_model(broken))
    assert all(w in str(err.value) for w in words), err.value
    assert "\n" not in str(err.value)


def test_sharded_directory_inconsistent_with_its_index_is_refused(tiny_models, tmp_path):
    broken = _copy(tiny_models / "qwen3_moe", tmp_path / "broken")
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    file = index["weight_map"]["model.embed_tokens.weight"]
    (broken / file).unlink()
    with pytest.raises(CheckpointError, match=rf"{file}, which does not exist"):
        check_hf_checkpoint(broken, describe_hf_model(broken))


# ---- parallel config ------------------------------------------------------------------------
def test_parallel_config_checks_world_size_and_model_fit():
    cfg = ParallelConfig(tp=2, ep=2, etp=1)
    assert cfg.dp(4) == 2 and cfg.uses_sequence_parallel
    with pytest.raises(ConfigError, match=r"world size 2 is not a multiple of etp\*ep\*pp = 1\*4\*1 = 4"):
        ParallelConfig(ep=4).check_world(2)
    with pytest.raises(ConfigError, match=r"world size 3 is not a multiple of tp\*pp"):
        ParallelConfig(tp=2).check_world(3)
    with pytest.raises(ConfigError, match="parallel.sequence_parallel: False must be on"):
        ParallelConfig(tp=2, sequence_parallel=False).check_model(num_layers=4, moe=True)
    with pytest.raises(ConfigError, match="parallel.sequence_parallel: True needs parallel.tp > 1"):
        ParallelConfig(sequence_parallel=True)
    with pytest.raises(ConfigError, match="3 layers cannot be split over pp=2"):
        ParallelConfig(pp=2).check_model(num_layers=3, moe=False)
    ParallelConfig(pp=2, pp_first_stage_layers=1).check_model(num_layers=3, moe=False)
    with pytest.raises(ConfigError, match="parallel.tp: 0 must be >= 1"):
        ParallelConfig(tp=0)


# ---- the command ----------------------------------------------------------------------------
def test_convert_refuses_a_broken_directory_with_one_line_naming_the_tensor(tiny_models, tmp_path, capsys):
    from r1mega import megatron_compat

    broken = _copy(tiny_models / "deepseek_v3", tmp_path / "broken")
    _rewrite(broken, lambda t: t.pop("model.layers.2.mlp.experts.5.down_proj.weight"))
    assert main(["convert", "--hf", str(broken), "--to-megatron", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("r1mega: error:") and "\n" not in err
    assert "missing tensor 'model.layers.2.mlp.experts.5.down_proj.weight'" in err
    assert not (tmp_path / "out").exists() and megatron_compat.applied_patches() == []  # refused before any work
    (broken / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert main(["convert", "--hf", str(broken), "--to-megatron", str(tmp_path / "out")]) == 2
    assert "model_type 'gpt2', architectures ['GPT2LMHeadModel'] is not supported" in capsys.readouterr().err


@pytest.mark.distributed
def test_convert_round_trips_bit_for_bit_across_layouts(tiny_models, tmp_path):
    source, megatron, back = tiny_models / "deepseek_v3", tmp_path / "megatron", tmp_path / "hf"
    out = run_torchrun("cli_convert.py", 2, "convert", "--hf", str(source), "--to-megatron", str(megatron),
                       "--tp", "2")
    assert "wrote megatron checkpoint" in out and "tp=2" in out
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_COMPILE_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-m", "r1mega.cli", "convert", "--megatron", str(megatron),
                           "--to-hf", str(back)], capture_output=True, text=True, env=env, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert same_tensors(source, back) == []
    assert (source / "generation_config.json").read_bytes() == (back / "generation_config.json").read_bytes()
    # config.json as it was, plus the router fields a real DeepSeek-V3 config spells out (transformers
    # writes none of topk_method / scoring_func, which vLLM would read as a softmax router)
    written, original = json.loads((back / "config.json").read_text()), json.loads((source / "config.json").read_text())
    assert "topk_method" not in original and "scoring_func" not in original
    assert written == {**original, "topk_method": "noaux_tc", "scoring_func": "sigmoid"}


# ---- the megatron shim's version guard ------------------------------------------------------
def test_shim_refuses_another_megatron_version_unless_allowed(monkeypatch):
    from r1mega import megatron_compat

    megatron_compat.check_megatron_version(megatron_compat.MEGATRON_VERSION)
    assert megatron_compat.installed_megatron_version() == megatron_compat.MEGATRON_VERSION
    monkeypatch.delenv("R1MEGA_ALLOW_MEGATRON_VERSION", raising=False)
    with pytest.raises(megatron_compat.ShimVersionError, match=r"megatron-core==0\.16\.1, found 0\.17\.0"):
        megatron_compat.check_megatron_version("0.17.0")
    monkeypatch.setenv("R1MEGA_ALLOW_MEGATRON_VERSION", "1")
    with pytest.warns(RuntimeWarning, match="found 0.17.0; applying them anyway"):
        megatron_compat.check_megatron_version("0.17.0")
