"""The parts of benchmarks/bench_vs_trl.py that decide whether the comparison with TRL is like for
like, checked without TRL: the hyper-parameter mapping, the reward adapter against r1mega's reward
pool, the prompts and their tokens, and the figures' arithmetic."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from trl_match import (  # noqa: E402
    Settings,
    r1mega_config,
    r1mega_hyperparameters,
    step_prompts,
    trl_config_kwargs,
    trl_hyperparameters,
    trl_reward_functions,
    trl_rows,
)

from r1mega.data import base_corpus  # noqa: E402


def _config(tmp_path, **settings):
    return r1mega_config(Settings(**settings), out_dir=tmp_path, name="r1mega", data=tmp_path / "train.jsonl")


def test_trl_keywords_carry_r1megas_hyperparameters(tmp_path):
    cfg = _config(tmp_path, steps=7, prompts=4, group=6, max_new_tokens=40, seed=3)
    kw = trl_config_kwargs(cfg, output_dir=tmp_path / "trl")
    assert trl_hyperparameters(kw) == r1mega_hyperparameters(cfg)
    # the sizes as TRL reads them: one generation batch of P x G rows = one optimizer step
    assert kw["per_device_train_batch_size"] == 24 and kw["num_generations"] == 6
    assert kw["gradient_accumulation_steps"] == kw["steps_per_generation"] == kw["num_iterations"] == 1
    assert (kw["max_steps"], kw["max_completion_length"], kw["seed"]) == (7, 40, 3)
    # the tiny recipe's optimisation and the loss of TRL's loss_type="grpo" on r1mega's side
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.adam_beta2, cfg.optim.weight_decay) == (5e-5, 5, 0.95, 0.0)
    assert (kw["learning_rate"], kw["warmup_steps"], kw["adam_beta2"], kw["weight_decay"]) == (5e-5, 5, 0.95, 0.0)
    assert kw["lr_scheduler_type"] == "constant_with_warmup"  # megatron's schedule: linear warm-up, then constant
    assert (cfg.grpo.agg, cfg.grpo.adv_eps, cfg.grpo.tis, cfg.grpo.kl_coef) == ("seq-mean-token-mean", 1e-4, False, 0.001)
    assert (kw["loss_type"], kw["beta"], kw["epsilon"], kw["epsilon_high"]) == ("grpo", 0.001, 0.2, 0.2)
    assert kw["router_aux_loss_coef"] == 0.0 and not kw["bf16"] and not kw["gradient_checkpointing"]
    assert not kw["shuffle_dataset"]  # the dataset is given in r1mega's sampler order


def test_a_loss_trl_cannot_express_is_refused(tmp_path):
    cfg = _config(tmp_path)
    for key, value in (("grpo.agg", "token-mean"), ("grpo.dual_clip", 3.0), ("batch.minibatches_per_step", 2),
                       ("grpo.kl_clamp", 10.0)):
        with pytest.raises(ValueError):
            trl_config_kwargs(cfg.with_values({key: value}), output_dir=tmp_path)


def test_a_changed_mapping_shows_in_the_comparison(tmp_path):
    cfg = _config(tmp_path)
    kw = trl_config_kwargs(cfg, output_dir=tmp_path)
    for key, value in (("per_device_train_batch_size", 32), ("beta", 0.0), ("lr_scheduler_type", "linear"),
                       ("adam_beta2", 0.999), ("scale_rewards", "batch"), ("router_aux_loss_coef", 0.001)):
        assert trl_hyperparameters({**kw, key: value}) != r1mega_hyperparameters(cfg), key


def test_trl_rewards_equal_the_reward_pools(tmp_path):
    from r1mega.rewards import RewardPool

    cfg = _config(tmp_path)
    records = base_corpus.problems("test", 6, seed=0)
    completions = []
    for r in records:
        a, b = r.meta["operands"]
        completions += [f"<think> {a}+{b} </think> <answer> {a + b} </answer>",  # right, formatted
                        f"<think> columns </think> <answer> {a + b + 10} </answer>",  # the slip
                        f"{a + b}",  # right number, no format
                        f"<think> x </think> <answer> {a + b} </answer> trailing <answer> 1 </answer>"]
    rows = [r for r in records for _ in range(4)]
    funcs, weights = trl_reward_functions(cfg, records)
    assert [f.__name__ for f in funcs] == ["accuracy", "format"] and weights == [1.0, 1.0]
    per_func = [f(prompts=[x["prompt"] for x in trl_rows(rows)], completions=completions,
                  completion_ids=[[0]] * len(rows), record_id=[r.id for r in rows], trainer_state=None)
                for f in funcs]
    with RewardPool.from_config(cfg.rewards, workers=1) as pool:
        scored = pool.score(rows, completions)
    for i, s in enumerate(scored):
        assert not s.errors
        assert [per_func[k][i] for k in range(len(funcs))] == [s.values["accuracy"], s.values["format"]]
        assert sum(w * per_func[k][i] for k, w in enumerate(weights)) == s.total  # TRL's weighted nansum
    assert {v for col in per_func for v in col} == {0.0, 1.0}  # both outcomes of both rewards were seen


def test_trl_prompts_are_r1megas_in_sampler_order_and_tokens(tmp_path):
    import transformers

    from r1mega.data import PromptSampler
    from r1mega.models.tokenizer import build_tokenizer, save_tokenizer
    from r1mega.run.base_model import PretrainSpec
    from r1mega.templates import render_prompts

    spec = PretrainSpec()  # the embedded base model's tokenizer, built as r1mega pretrain builds it
    corpus = base_corpus.corpus(base_corpus.problems("train", spec.train_problems, seed=spec.seed), noise=spec.noise,
                                seed=spec.seed)
    save_tokenizer(build_tokenizer(corpus, vocab_size=spec.vocab_size), tmp_path / "tokenizer")

    cfg = _config(tmp_path, steps=40, prompts=8)
    records = base_corpus.problems("train", seed=0)
    steps = step_prompts(records, cfg)
    sampler = PromptSampler(records, batch_size=8, seed=0)
    assert steps == [next(sampler) for _ in range(40)] and len({r.id for b in steps for r in b}) == 320
    ordered = [r for batch in steps for r in batch]
    rows = trl_rows(ordered)
    assert [r["record_id"] for r in rows] == [r.id for r in ordered]
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    # TRL tokenizes a text prompt as processing_class(text=prompts): special tokens at their default
    assert tok(text=[r["prompt"] for r in rows])["input_ids"] == \
        render_prompts(ordered, tok, "r1_zero", cfg.rollout.max_prompt_tokens)


def test_figures_follow_their_definitions():
    from bench_vs_trl import side_figures

    f = side_figures([2.0, 4.0, 3.0], [100, 200, 300], [50, 50, 50], rollout_s=3.0, train_s=1.5, phases={})
    assert (f["step_s_median"], f["step_s_total"]) == (3.0, 9.0)
    assert f["generated_tokens_per_s"] == 200.0  # 600 completion tokens in 3 s of rollout
    assert f["train_tokens_per_s"] == 500.0  # (600 + 150) tokens trained in 1.5 s
    assert math.isclose(f["end_to_end_tokens_per_s"], 600 / 9)
