"""FP8 through Transformer Engine, TE's grouped experts and THD packing: the knobs (policy
section) and their one place in the TransformerConfig builder on CPU; the real TE paths on a GPU
with Transformer Engine (gpu-marked; skipped where TE is absent, as on the device machines that
carry no TE wheel)."""

from __future__ import annotations

import pytest
import torch

from r1mega.config import Config, ConfigError, PolicyConfig


def test_fp8_knobs_are_checked_in_one_line():
    cfg = Config().with_overrides(["policy.fp8=e4m3", "policy.fp8_recipe=blockwise"])
    assert (cfg.policy.fp8, cfg.policy.fp8_recipe) == ("e4m3", "blockwise")
    for sets, message in ((["policy.fp8_recipe=blockwise"], "policy.fp8_recipe: 'blockwise' needs policy.fp8"),
                          (["policy.fp8=e5m2"], "policy.fp8: 'e5m2' is not one of"),
                          (["policy.fp8=hybrid", "policy.fp8_recipe=tensorwise", "policy.fp8_amax_history_len=16"],
                           "policy.fp8_amax_history_len: 16 is for policy.fp8_recipe=delayed"),
                          (["policy.packed_format=bshd"], "policy.packed_format: 'bshd' is not one of")):
        with pytest.raises(ConfigError) as err:
            Config().with_overrides(sets)
        assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def test_fp8_fields_are_megatrons_and_refused_without_transformer_engine(tiny_models):
    """fp8_config's fields are TransformerConfig's own (megatron accepts them); without TE (this
    CPU) make_transformer_config refuses FP8 in one line naming the knob."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from r1mega.models.hf_config import describe_hf_model
    from r1mega.models.transformer_config import fp8_config, make_transformer_config
    from r1mega.parallel import ParallelConfig

    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, bf16=True, params_dtype=torch.bfloat16)
    delayed = fp8_config(PolicyConfig(fp8="hybrid", fp8_amax_history_len=16, fp8_amax_compute_algo="most_recent",
                                      fp8_margin=1), use_te=True)
    assert delayed == dict(fp8="hybrid", fp8_recipe="delayed", fp8_margin=1, fp8_amax_history_len=16,
                           fp8_amax_compute_algo="most_recent")
    blockwise = fp8_config(PolicyConfig(fp8="e4m3", fp8_recipe="blockwise"), use_te=True)
    assert blockwise == dict(fp8="e4m3", fp8_recipe="blockwise", fp8_margin=0)
    for fields in (delayed, blockwise):
        config = TransformerConfig(**base, **fields)
        assert all(getattr(config, k) == v for k, v in fields.items())
    assert fp8_config(PolicyConfig(), use_te=False) == {}
    desc = describe_hf_model(tiny_models / "qwen3_moe")
    with pytest.raises(ConfigError) as err:
        make_transformer_config(desc, ParallelConfig(), policy=PolicyConfig(fp8="e4m3"))
    assert str(err.value).startswith("policy.fp8: 'e4m3' needs Transformer Engine on a CUDA GPU"), str(err.value)
    grouped = make_transformer_config(desc, ParallelConfig(), policy=PolicyConfig(grouped_gemm=True))
    assert grouped.moe_grouped_gemm and not grouped.fp8


def test_train_with_fp8_on_cpu_stops_in_one_line_before_any_work(tmp_path, small_base_model):
    from tests.trainer_helpers import r1mega

    proc = r1mega("train", "--quiet", "--model", str(small_base_model), "--set", f"run.out_dir={tmp_path}",
                  "--set", "policy.fp8=e4m3", "--set", "run.steps=1", timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "policy.fp8" in line]
    assert lines and "needs Transformer Engine" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "r1mega" / "checkpoints").exists()


def _te_or_skip():
    from r1mega.models.transformer_config import transformer_engine_available

    if not transformer_engine_available():
        pytest.skip("needs Transformer Engine on a CUDA GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["delayed", "blockwise"])
def test_fp8_train_step_follows_bf16(tiny_models, recipe):
    """One GRPO step of the tiny Qwen3-MoE in FP8 (TE layers, grouped experts, THD) has the bf16
    step's loss within FP8's error and updates the weights."""
    _te_or_skip()
    from r1mega.algo import LossSpec
    from r1mega.models import load_policy

    path = tiny_models / "qwen3_moe"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (4, 64), generator=g)
    cm = torch.zeros_like(ids, dtype=torch.bool)
    cm[:, 32:] = True
    results = {}
    for name, policy_config in (("bf16", PolicyConfig(grouped_gemm=True, packed_format="thd")),
                                ("fp8", PolicyConfig(grouped_gemm=True, packed_format="thd", fp8="e4m3",
                                                     fp8_recipe=recipe))):
        policy = load_policy(path, dtype=torch.bfloat16, policy=policy_config)
        logp = policy.logprobs(ids)
        batch = dict(input_ids=ids, attention_mask=torch.ones_like(cm), completion_mask=cm, old_logp=logp,
                     advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]))
        results[name] = policy.train_step(batch, LossSpec())
        assert results[name]["update_successful"] == 1.0
        del policy
    assert abs(results["fp8"]["loss"] - results["bf16"]["loss"]) <= 0.05 * abs(results["bf16"]["loss"]) + 1e-3
