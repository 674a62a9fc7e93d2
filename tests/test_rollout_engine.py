"""The `hf` rollout engine in one process, against transformers' own models and warpers.

Weights come from the fixture checkpoints (a pass of a 'stream' read from the safetensors files);
the layout matrix with a megatron policy feeding the engine is tests/test_rollout_conformance.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from r1mega.rollout import (
    EngineStateError,
    SamplingParams,
    finish_mismatch,
    make_engine,
    mismatch_metrics,
    mismatch_sums,
    processed_logits,
)
from tests.models_fixtures import load_hf_model

ARCHS = ("deepseek_v3", "qwen3_moe", "qwen2", "llama")
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
TOL = 1e-4


def checkpoint_stream(path: Path) -> list[list[tuple[str, torch.Tensor]]]:
    """One bucket per safetensors file: the tensors exactly as the checkpoint holds them."""
    from safetensors.torch import load_file

    return [list(load_file(f).items()) for f in sorted(Path(path).glob("*.safetensors"))]


def loaded_engine(path: Path, **options):
    engine = make_engine("hf", path, **options)
    engine.refit(checkpoint_stream(path))
    return engine


@pytest.fixture(scope="module")
def engines(tiny_models):
    return {arch: loaded_engine(tiny_models / arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def references(tiny_models):
    return {arch: load_hf_model(tiny_models / arch) for arch in ARCHS}


def transformers_logits(model, prompt, tokens) -> torch.Tensor:
    """[L, V] float64 logits that predicted each completion token, from one full forward."""
    seq = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        logits = model(seq).logits[0].double()
    return logits[len(prompt) - 1: len(prompt) - 1 + len(tokens)]


def warped(logits, temperature, top_k, top_p):
    """transformers' own warpers, in the order generate applies them (temperature, top-k, top-p)."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    x = logits.clone()
    if temperature != 1.0:
        x = TemperatureLogitsWarper(temperature)(None, x)
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1.0:
        x = TopPLogitsWarper(top_p)(None, x)
    return x


# ---- sampling ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, word", [
    (dict(n=0), "n"), (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(stop=("",)), "stop"), (dict(stop_token_ids=(-3,)), "stop_token_ids"), (dict(seed=-1), "seed"),
    (dict(n=True), "n"), (dict(return_routes=1), "return_routes"),
])
def test_sampling_params_refuse_bad_values(bad, word):
    with pytest.raises(ValueError, match=f"SamplingParams.{word}"):
        SamplingParams(**bad)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 7, 1.0), (1.3, 0, 0.8),
                                                       (0.6, 20, 0.95), (1.0, 1, 1.0)])
def test_processed_logits_equal_transformers_warpers(gen, temperature, top_k, top_p):
    logits = torch.randn(37, 301, generator=gen, dtype=torch.float64) * 3
    ours = processed_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    theirs = warped(logits, temperature, top_k, top_p)
    kept = torch.isfinite(theirs)
    assert torch.equal(torch.isfinite(ours), kept)
    assert torch.allclose(ours[kept].double(), theirs[kept], rtol=1e-6, atol=1e-6)


# ---- log-probs, greedy, seeds ------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 12, 0.9)])
def test_logprobs_equal_transformers(engines, references, arch, temperature, top_k, top_p):
    params = SamplingParams(n=3, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=9, seed=4)
    completions = engines[arch].generate(PROMPTS, params)
    assert [(c.prompt_index, c.sample_index) for c in completions] == [(i, j) for i in range(3) for j in range(3)]
    worst = 0.0
    for c in completions:
        x = warped(transformers_logits(references[arch], PROMPTS[c.prompt_index], c.token_ids), temperature, top_k,
                   top_p)
        expected = torch.log_softmax(x, -1).gather(-1, c.token_ids[:, None])[:, 0]
        assert torch.isfinite(expected).all(), "a token outside the top-k / top-p set was sampled"
        worst = max(worst, float((c.logprobs.double() - expected).abs().max()))
        assert c.logprobs.dtype == torch.float32 and c.token_ids.dtype == torch.int64
    print(f"{arch} T={temperature} top_k={top_k} top_p={top_p}: max |engine - transformers| = {worst:.3g}")
    assert worst < TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_transformers_argmax(engines, references, arch):
    completions = engines[arch].generate(PROMPTS, SamplingParams(n=2, temperature=0.0, max_new_tokens=8))
    model = references[arch]
    for c in completions:
        seq = list(PROMPTS[c.prompt_index])
        for _ in range(8):  # transformers' full forward every step, no cache
            with torch.no_grad():
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        assert c.token_ids.tolist() == seq[len(PROMPTS[c.prompt_index]):], (arch, c.prompt_index)


def test_seeded_runs_are_reproducible_and_per_prompt(tiny_models, engines):
    engine = engines["qwen3_moe"]
    params = SamplingParams(n=4, max_new_tokens=12, seed=7)
    a = engine.generate(PROMPTS, params)
    b = engine.generate(PROMPTS, params)
    assert all(torch.equal(x.token_ids, y.token_ids) and torch.equal(x.logprobs, y.logprobs) for x, y in zip(a, b))
    fewer = engine.generate(PROMPTS[:2], params)  # the other prompts do not matter
    assert all(torch.equal(x.token_ids, y.token_ids) for x, y in zip(a, fewer))
    rest = engine.generate(PROMPTS[1:], params, first_prompt_index=1)  # a batch split over engines
    assert [c.prompt_index for c in rest[:4]] == [1] * 4
    assert all(torch.equal(x.token_ids, y.token_ids) for x, y in zip(a[4:], rest))
    with pytest.raises(ValueError, match="first_prompt_index"):
        engine.generate(PROMPTS, params, first_prompt_index=-1)
    chunked = loaded_engine(tiny_models / "qwen3_moe", max_batch_rows=5).generate(PROMPTS, params)
    assert all(torch.equal(x.token_ids, y.token_ids) for x, y in zip(a, chunked))
    other = engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=12, seed=8))
    assert any(not torch.equal(x.token_ids, y.token_ids) for x, y in zip(a, other))
    assert len({tuple(c.token_ids.tolist()) for c in a}) > 6, "the samples of a group should differ"
    free1 = engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=12))
    free2 = engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=12))
    assert any(not torch.equal(x.token_ids, y.token_ids) for x, y in zip(free1, free2))


def test_sampling_follows_the_distribution(tiny_models):
    """Empirical first-token frequencies match the processed distribution (chi-square, fixed seed)."""
    engine = loaded_engine(tiny_models / "qwen2")
    ref = load_hf_model(tiny_models / "qwen2")
    with torch.no_grad():
        logits = ref(torch.tensor([PROMPTS[1]])).logits[0, -1].double()
    probs = torch.softmax(processed_logits(logits, temperature=1.0, top_k=8), -1)
    completions = engine.generate([PROMPTS[1]], SamplingParams(n=4000, top_k=8, max_new_tokens=1, seed=0))
    counts = torch.bincount(torch.tensor([int(c.token_ids[0]) for c in completions]), minlength=len(probs)).double()
    kept = probs > 0
    assert counts[~kept].sum() == 0
    expected = probs[kept] * len(completions)
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    assert chi2 < 30.0, chi2  # 7 degrees of freedom: p < 1e-4 above 30


# ---- stopping ----------------------------------------------------------------------------------
def test_max_new_tokens_and_stop_token_ids(engines):
    engine = engines["llama"]
    free = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=10, seed=3, ignore_eos=True))
    assert all(len(c) == 10 and c.finish_reason == "length" for c in free)
    target = free[0]
    stop = int(target.token_ids[4])
    first = target.token_ids.tolist().index(stop)
    stopped = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=10, seed=3, ignore_eos=True,
                                                      stop_token_ids=(stop,)))
    got = stopped[0]
    assert got.token_ids.tolist() == target.token_ids.tolist()[:first + 1]
    assert got.finish_reason == "stop" and got.stop_reason == stop
    for c in stopped:
        ids = c.token_ids.tolist()
        assert stop not in ids[:-1] and (c.finish_reason == "stop") == (ids[-1] == stop)
        assert len(c.logprobs) == len(ids) and c.finish_s >= c.first_token_s > 0


def test_eos_from_the_config_ends_completions(tiny_models):
    import json

    free = loaded_engine(tiny_models / "qwen2").generate(PROMPTS, SamplingParams(max_new_tokens=10, seed=1))
    eos = int(free[0].token_ids[2])
    config = json.loads((tiny_models / "qwen2" / "config.json").read_text())
    engine = make_engine("hf", {**config, "eos_token_id": eos})
    engine.refit(checkpoint_stream(tiny_models / "qwen2"))
    c = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, seed=1))[0]
    assert c.token_ids[-1] == eos and c.finish_reason == "stop" and c.stop_reason is None
    assert len(engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, seed=1, ignore_eos=True))[0]) == 10


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory):
    """A tokenizer whose 256 tokens are single characters (so stop strings span tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(0x100 + i): i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=chr(0x100)))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    out = tmp_path_factory.mktemp("char-tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=chr(0x100)).save_pretrained(out)
    return out


def test_stop_strings(tiny_models, char_tokenizer):
    engine = loaded_engine(tiny_models / "qwen2", tokenizer=char_tokenizer)
    params = dict(n=2, max_new_tokens=12, seed=5, ignore_eos=True)
    free = engine.generate(PROMPTS, SamplingParams(**params))
    text = engine.tokenizer.decode(free[0].token_ids.tolist())
    stop = text[3:6]
    end = text.index(stop) + len(stop)
    got = engine.generate(PROMPTS, SamplingParams(stop=(stop, "never-there"), **params))[0]
    assert engine.tokenizer.decode(got.token_ids.tolist()) == text[:end]
    assert got.finish_reason == "stop" and got.stop_reason == stop
    with pytest.raises(ValueError, match="tokenizer"):
        loaded_engine(tiny_models / "qwen2").generate(PROMPTS, SamplingParams(stop=("x",)))


def test_abort_ends_unfinished_completions(tiny_models):
    engine = loaded_engine(tiny_models / "llama")
    calls = {"n": 0}
    forward = engine._forward

    def aborting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the prefill, then three decode steps
            engine.abort()
        return forward(*args, **kwargs)

    engine._forward = aborting
    completions = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=20, seed=0, ignore_eos=True))
    assert {c.finish_reason for c in completions} == {"abort"} and {len(c) for c in completions} == {4}
    engine._forward = forward
    assert {c.finish_reason for c in engine.generate(PROMPTS, SamplingParams(max_new_tokens=5, ignore_eos=True))} \
        == {"length"}


def test_prompts_are_checked(engines):
    engine = engines["qwen2"]
    for bad, word in (([], "non-empty"), ([[1, 2], []], "prompt 1 is empty"), ([[1, 999]], "prompt 0: token id 999"),
                      ([[1] * 250], "exceed")):
        with pytest.raises(ValueError, match=word):
            engine.generate(bad, SamplingParams(max_new_tokens=10))


# ---- routes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe"])
def test_routes_are_recorded_for_prompt_and_completion(engines, arch):
    engine = engines[arch]
    completions = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=6, seed=1, return_routes=True))
    k = engine.routes.top_k
    for c in completions:
        p = len(PROMPTS[c.prompt_index])
        assert c.routes.shape == (p + len(c), len(engine.moe_layers), k) and c.routes.dtype == torch.int16
        assert int(c.routes.min()) >= 0 and int(c.routes.max()) < engine.desc.moe.num_experts
        assert all(len(set(row.tolist())) == k for row in c.routes.reshape(-1, k))  # distinct experts
    # the cached decode routed like one full forward over the whole sequence
    c = completions[0]
    seq = torch.tensor([PROMPTS[0] + c.token_ids.tolist()])
    engine.routes.enabled = True
    with torch.inference_mode():
        engine.model(seq)
    full = engine.routes.take(1, seq.shape[1])[0]
    engine.routes.enabled = False
    assert torch.equal(full[:-1].sort(-1).values, c.routes[:-1].sort(-1).values)
    assert engine.generate(PROMPTS, SamplingParams(max_new_tokens=2))[0].routes is None
    with pytest.raises(ValueError, match="MoE"):
        engines["qwen2"].generate(PROMPTS, SamplingParams(return_routes=True))


# ---- weights and states ------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_held_weights_are_the_loaded_tensors(tiny_models, engines, arch):
    engine = engines[arch]
    stream = checkpoint_stream(tiny_models / arch)
    assert engine.verify_weights(stream) == []
    loaded = {n: t for b in stream for n, t in b}
    assert sorted(engine.expected_weights) == sorted(loaded)
    name = sorted(loaded)[-1]
    bad = [[(n, t + 1 if n == name else t) for n, t in b] for b in stream]
    assert engine.verify_weights(bad) == [name]


def test_state_machine(tiny_models):
    path = tiny_models / "deepseek_v3"
    stream = checkpoint_stream(path)
    engine = make_engine("hf", path)
    params = SamplingParams(n=2, max_new_tokens=6, seed=9)
    with pytest.raises(EngineStateError, match="complete refit"):
        engine.generate(PROMPTS, params)
    engine.refit(stream)
    reference = engine.generate(PROMPTS, params)
    same = lambda got: all(torch.equal(a.token_ids, b.token_ids) for a, b in zip(got, reference))  # noqa: E731

    engine.sleep(level=1)
    assert engine.state == {"weights": "asleep", "kv_cache": "asleep", "current": True, "closed": False}
    with pytest.raises(EngineStateError, match="wake_up"):
        engine.generate(PROMPTS, params)
    with pytest.raises(EngineStateError, match="already"):
        engine.sleep()
    with pytest.raises(EngineStateError, match="before the KV cache"):
        engine.wake_up(["kv_cache"])
    with pytest.raises(EngineStateError, match="load_weights while the weights sleep"):
        engine.load_weights(stream[0][:1])
    engine.wake_up(["weights"])
    with pytest.raises(EngineStateError, match="kv_cache"):
        engine.generate(PROMPTS, params)
    engine.wake_up(["kv_cache"])
    assert same(engine.generate(PROMPTS, params))  # level 1 kept the weights

    engine.sleep(level=2)  # drops them: nothing generates until a whole refit
    assert sum(p.numel() for p in engine.model.parameters()) == 0
    engine.wake_up()
    with pytest.raises(EngineStateError, match="dropped by sleep"):
        engine.generate(PROMPTS, params)
    engine.load_weights(stream[0][:3])
    with pytest.raises(EngineStateError, match="not loaded"):
        engine.generate(PROMPTS, params)
    engine.refit(stream)
    assert same(engine.generate(PROMPTS, params))

    with pytest.raises(EngineStateError, match="while the weights are awake"):
        engine.wake_up(["weights"])
    for bad in (["cache"], []):
        with pytest.raises(ValueError, match="wake_up tags"):
            engine.wake_up(bad)
    with pytest.raises(ValueError, match="sleep level"):
        engine.sleep(level=3)
    with pytest.raises(KeyError, match="does not have"):
        engine.load_weights([("model.layers.9.mlp.gate.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        engine.load_weights([("model.norm.weight", torch.zeros(3))])
    with pytest.raises(ValueError, match="lacked"):
        engine.refit([stream[0][:2]])
    assert engine.refit([stream[0][:2]], allow_partial=True).tensors == 2
    with pytest.raises(ValueError, match="twice"):
        engine.refit([stream[0][:2], stream[0][:1]])
    with pytest.raises(TypeError, match="SamplingParams"):
        engine.generate(PROMPTS, {"n": 2})
    engine.close()
    engine.close()
    for call in (lambda: engine.generate(PROMPTS, params), lambda: engine.refit(stream), engine.sleep,
                 engine.wake_up, engine.reset_prefix_cache):
        with pytest.raises(EngineStateError, match="after close"):
            call()


def test_refit_stats_and_bf16(tiny_models):
    path = tiny_models / "qwen3_moe"
    engine = make_engine("hf", path, dtype=torch.bfloat16)
    stats = engine.refit(checkpoint_stream(path))
    assert stats.tensors == len(engine.expected_weights) and stats.buckets == len(list(path.glob("*.safetensors")))
    assert stats.bytes == sum(t.numel() * t.element_size() for b in checkpoint_stream(path) for _, t in b)
    assert stats.gb_per_s > 0
    assert engine.verify_weights(checkpoint_stream(path)) == []  # compared after the cast to bf16
    c = engine.generate(PROMPTS, SamplingParams(max_new_tokens=5, seed=0))[0]
    fp32 = loaded_engine(path).generate(PROMPTS, SamplingParams(max_new_tokens=5, seed=0, temperature=0.0))
    assert c.logprobs.dtype == torch.float32 and len(fp32[0]) == 5


# ---- decode kernels ----------------------------------------------------------------------------
@pytest.mark.parametrize("heads, kv_heads, dim, v_dim", [(4, 2, 16, 16), (4, 4, 24, 16), (6, 1, 8, 8)])
def test_decode_attention_equals_sdpa(gen, heads, kv_heads, dim, v_dim):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from r1mega.rollout.hf_kernels import decode_attention

    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads
    module.is_causal, module.training = True, False
    rows, length = 5, 13
    q = torch.randn(rows, heads, 1, dim, generator=gen)
    k_buf = torch.randn(rows, kv_heads, 20, dim, generator=gen)
    v_buf = torch.randn(rows, kv_heads, 20, v_dim, generator=gen)
    k, v = k_buf[:, :, :length], v_buf[:, :, :length]  # the cache's strided views
    mask = torch.ones(rows, 1, 1, length, dtype=torch.bool)
    mask[1, ..., :4] = False
    for m in (mask, None):
        ours, _ = decode_attention(module, q, k, v, m, scaling=0.3)
        kr = k.repeat_interleave(heads // kv_heads, 1)
        vr = v.repeat_interleave(heads // kv_heads, 1)
        plain = torch.nn.Module()  # keys and values already repeated per query head
        plain.num_key_value_groups, plain.is_causal, plain.training = 1, True, False
        theirs, _ = sdpa_attention_forward(plain, q, kr.contiguous(), vr.contiguous(), m, scaling=0.3)
        assert ours.shape == theirs.shape == (rows, 1, heads, v_dim)
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 7, 96, 150])
def test_decode_experts_equal_transformers(tiny_models, engines, gen, tokens):
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    from r1mega.rollout.hf_kernels import decode_experts

    experts = engines["qwen3_moe"].model.model.layers[1].mlp.experts
    hidden = torch.randn(tokens, experts.gate_up_proj.shape[-1], generator=gen)
    idx = torch.stack([torch.randperm(experts.num_experts, generator=gen)[:2] for _ in range(tokens)])
    weights = torch.rand(tokens, 2, generator=gen)
    with torch.no_grad():
        ours = decode_experts(experts, hidden, idx, weights)
        theirs = ALL_EXPERTS_FUNCTIONS["grouped_mm"](experts, hidden, idx, weights)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)


# ---- mismatch metrics --------------------------------------------------------------------------
def test_mismatch_metrics_formulas(gen):
    rollout = torch.randn(4, 9, generator=gen) - 2
    trainer = rollout + 0.3 * torch.randn(4, 9, generator=gen)
    mask = torch.rand(4, 9, generator=gen) > 0.3
    got = mismatch_metrics(rollout, trainer, mask, tis_cap=1.2)
    d = [float(t - r) for t, r, m in zip(trainer.flatten().double(), rollout.flatten().double(), mask.flatten()) if m]
    assert got["mismatch_tokens"] == len(d)
    assert math.isclose(got["mismatch_abs_mean"], sum(abs(x) for x in d) / len(d), rel_tol=1e-12)
    assert math.isclose(got["mismatch_abs_max"], max(abs(x) for x in d), rel_tol=1e-12)
    assert math.isclose(got["mismatch_k3"], sum(math.exp(x) - x - 1 for x in d) / len(d), rel_tol=1e-9)
    assert math.isclose(got["tis_capped_frac"], sum(math.exp(x) > 1.2 for x in d) / len(d))
    same = mismatch_metrics(rollout, rollout, mask, tis_cap=2.0)
    assert same["mismatch_abs_max"] == same["mismatch_k3"] == same["tis_capped_frac"] == 0.0
    halves = [mismatch_sums(rollout[i:i + 2], trainer[i:i + 2], mask[i:i + 2], tis_cap=1.2) for i in (0, 2)]
    merged = finish_mismatch(halves[0][0] + halves[1][0], torch.maximum(halves[0][1], halves[1][1]))
    assert all(math.isclose(merged[k], got[k], rel_tol=1e-12) for k in got)
    empty = mismatch_metrics(rollout, trainer, torch.zeros_like(mask))
    assert empty["mismatch_tokens"] == 0 and empty["mismatch_abs_mean"] == 0.0
    with pytest.raises(ValueError, match="one shape"):
        mismatch_metrics(rollout, trainer[:, 1:], mask)


# ---- config ------------------------------------------------------------------------------------
def test_engine_and_sampling_from_config(tiny_models):
    from r1mega.config import Config
    from r1mega.rollout import HFEngine, engine_from_config, sampling_params

    cfg = Config().with_overrides(["rollout.temperature=0.6", "rollout.top_p=0.95", "rollout.top_k=5",
                                   "rollout.max_new_tokens=7", "rollout.max_batch_rows=9",
                                   "rollout.router_replay=true"])
    engine = engine_from_config(cfg.rollout, tiny_models / "qwen3_moe", seed=3)
    assert isinstance(engine, HFEngine) and engine.max_batch_rows == 9
    params = sampling_params(cfg.rollout, n=4, seed=2)
    assert (params.n, params.temperature, params.top_p, params.top_k, params.max_new_tokens, params.seed,
            params.return_routes) == (4, 0.6, 0.95, 5, 7, 2, True)
    for key in ("rollout.fp8=true", "rollout.tp=2"):
        with pytest.raises(ValueError, match="vllm engine"):
            engine_from_config(Config().with_overrides([key]).rollout, tiny_models / "qwen2")
    with pytest.raises(ValueError, match="unknown rollout engine"):
        make_engine("sglang", tiny_models / "qwen2")
