"""The fused GRPO loss (r1mega.ops.grpo_loss, r1mega_kernels.grpo_loss) against policy_loss.

The reference is r1mega.ops.reference_grpo_loss: r1mega.algo.policy_loss applied to
r1mega.algo.token_logprobs of the full logits. For every option combination, loss, gradient with
respect to the logits and every metric are compared as in test_kernels_logprob: our error against
the float64 reference at most twice plain torch's error at the same input precision, plus a
rounding floor. For tensors (the gradient) the floor is two float32 ulps of the tensor's scale.
The loss and the metrics are scalars summed from many tokens, whose single error is a noisy
draw (torch's can be near 0 by chance); their floor is measured as well: how far the float64
reference moves when every log-prob moves by two float32 ulps (three sign patterns). Inputs are
fresh random draws each run (seed printed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from r1mega_kernels.grpo_loss import grpo_forward, grpo_token_terms  # after conftest set TRITON_INTERPRET

from r1mega.algo import AGG_MODES, KL_ESTIMATORS, LossSpec, LossSpecError, local_denominators, policy_loss
from r1mega.ops import grpo_loss, reference_grpo_loss, reference_token_logprobs
from tests.loss_cases import split_options
from tests.test_kernels_logprob import (
    BACKENDS,
    DEVICES,
    KERNEL_DEVICE,
    assert_within_torch_error,
    random_logits,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's masked lanes


CASES = {
    "defaults": dict(),
    "asymmetric-clip": dict(eps_low=0.1, eps_high=0.28),
    "dual-clip": dict(dual_clip=1.5, spread=0.8),
    "gspo": dict(ratio_level="sequence", eps_low=0.01, eps_high=0.01, spread=0.6),
    "gspo-dual-clip": dict(ratio_level="sequence", dual_clip=1.2, eps_low=0.05, eps_high=0.1, spread=1.0),
    **{f"kl-{e}": dict(kl_estimator=e, kl_coef=0.3, with_ref=True) for e in KL_ESTIMATORS},
    **{f"kl-{e}-clamp": dict(kl_estimator=e, kl_coef=0.3, kl_clamp=0.4, with_ref=True) for e in KL_ESTIMATORS},
    "kl-k3-verl-clamp-far-ref": dict(kl_estimator="k3", kl_coef=0.3, kl_clamp=10.0, with_ref=True, far_ref=True),
    "kl-k3+-verl-clamp-far-ref": dict(kl_estimator="k3+", kl_coef=0.3, kl_clamp=10.0, with_ref=True, far_ref=True),
    "kl-metric-only": dict(kl_estimator="k2", with_ref=True),
    "tis": dict(with_rollout=True),
    "tis-cap": dict(with_rollout=True, tis_cap=1.1),
    "per-token-adv": dict(adv_per_token=True),
    "no-lower-clip": dict(eps_low=10.0, eps_high=0.28, spread=1.0),
    "everything": dict(
        adv_per_token=True, eps_low=0.15, eps_high=0.3, dual_clip=2.0, spread=0.8, with_ref=True,
        kl_estimator="k3+", kl_coef=0.05, kl_clamp=10.0, with_rollout=True, tis_cap=1.5,
    ),
    "gspo-everything": dict(
        ratio_level="sequence", eps_low=0.05, eps_high=0.1, dual_clip=1.5, spread=0.8, with_ref=True,
        kl_estimator="k1+", kl_coef=0.05, with_rollout=True, tis_cap=1.5,
    ),
}


def make_batch(gen, case, *, S=7, T=13, V=257, dtype=torch.float32, device="cpu", temperature=0.8):
    """Logits, tokens and policy_loss inputs: right-padded masks with an empty and a full sequence."""
    opts = dict(CASES[case])
    spread = opts.pop("spread", 0.3)
    logits, tokens = random_logits(gen, (S, T), V, dtype)
    lengths = torch.randint(1, T + 1, (S,), generator=gen)
    lengths[min(2, S - 1)], lengths[0] = 0, T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    logp = reference_token_logprobs_f32(logits, tokens, temperature)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    batch = dict(
        logits=logits, tokens=tokens, mask=mask, old_logp=logp + spread * randn(S, T),
        advantages=randn(S, T) if opts.pop("adv_per_token", False) else randn(S),
    )
    ref = logp + 0.5 * randn(S, T)
    if opts.pop("far_ref", False):  # d = ref - logp beyond +-20 and k3 beyond 10: verl's clamps act
        ref[0, :3] += 25.0
        ref[1, :3] -= 30.0
        ref[3, :2] += 12.0
    if opts.pop("with_ref", False):
        opts["ref_logp"] = ref
    if opts.pop("with_rollout", False):
        opts["rollout_logp"] = batch["old_logp"] + 0.3 * randn(S, T)
    on_device = {k: v.to(device) for k, v in batch.items()}
    return on_device, {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in opts.items()}


def reference_token_logprobs_f32(logits, tokens, temperature):
    with torch.no_grad():
        return torch.log_softmax(logits.double() / temperature, -1).gather(-1, tokens[..., None])[..., 0].float()


def evaluate(fn, batch, opts, *, cast=None, **kwargs):
    """(loss, metrics, d loss / d logits) of fn; ``cast`` converts every float input first. The
    loss options of ``opts`` are fn's LossSpec, the rest (tensors, denominators) its arguments."""
    cast = cast or (lambda x: x)
    logits = cast(batch["logits"]).detach().clone().requires_grad_()
    floats = {k: cast(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in opts.items()}
    spec, rest = split_options(floats)
    loss, metrics = fn(logits, batch["tokens"], cast(batch["old_logp"]), cast(batch["advantages"]), batch["mask"],
                       spec, **rest, **kwargs)
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), metrics, grad


def logp_rounding_floors(batch, opts, temperature, ulps=2.0):
    """How far the float64 loss, metrics and d loss / d logits move when each log-prob moves by
    ``ulps`` float32 ulps: the rounding any float32 log-prob carries (about 1e-6 near -8)."""
    spec, double = split_options(opts)
    double = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in double.items()}
    args = (batch["old_logp"].double(), batch["advantages"].double(), batch["mask"])
    logits = batch["logits"].double().requires_grad_()
    logp = reference_token_logprobs(logits, batch["tokens"], temperature=temperature)

    def loss_metrics_grad(shift):
        loss, metrics = policy_loss(logp + shift, *args, spec, **double)
        (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
        return loss, metrics, grad

    loss, metrics, grad = loss_metrics_grad(0.0)
    step = ulps * torch.finfo(torch.float32).eps * logp.detach().abs().clamp(min=1.0)
    random_signs = torch.randint(0, 2, logp.shape, generator=torch.Generator().manual_seed(0)).to(logp) * 2 - 1
    floors = dict.fromkeys(["loss", "grad", *metrics], 0.0)
    # Two implementations round each log-prob independently, so their losses differ by about
    # sum_t dloss/dlogp_t * delta_t with delta_t of random sign: four standard deviations of that
    # sum bound it (the sampled directions below can cancel when advantages have mixed signs).
    (dloss_dlogp,) = torch.autograd.grad(policy_loss(logp, *args, spec, **double)[0], logp, retain_graph=True)
    floors["loss"] = 4.0 * (dloss_dlogp * step).square().sum().sqrt().item()
    for signs in (1.0, -1.0, random_signs):
        moved_loss, moved_metrics, moved_grad = loss_metrics_grad(signs * step)
        floors["grad"] = max(floors["grad"], (moved_grad - grad).abs().max().item())
        for key, base, moved in [("loss", loss, moved_loss)] + [(k, metrics[k], moved_metrics[k]) for k in metrics]:
            floors[key] = max(floors[key], (moved - base).abs().item())
    return floors


def check_case(batch, opts, backend, temperature=0.8, **kwargs):
    ours = evaluate(grpo_loss, batch, opts, backend=backend, temperature=temperature, **kwargs)
    same = evaluate(reference_grpo_loss, batch, opts, temperature=temperature, **kwargs)
    ref = evaluate(reference_grpo_loss, batch, opts, cast=torch.Tensor.double, temperature=temperature, **kwargs)
    floors = logp_rounding_floors(batch, opts, temperature)
    assert ours[0].dtype == same[0].dtype and ours[2].dtype == same[2].dtype == batch["logits"].dtype
    assert list(ours[1]) == list(same[1]), "metrics keys and order"
    assert_within_torch_error("loss", ours[0], same[0], ref[0], floor=floors["loss"])
    assert_within_torch_error("grad", ours[2], same[2], ref[2], floor=floors["grad"])
    for key in same[1]:
        assert ours[1][key].dtype == same[1][key].dtype and not ours[1][key].requires_grad, key
        assert_within_torch_error(f"metric {key}", ours[1][key], same[1][key], ref[1][key], floor=floors[key])
    return ours


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_every_option_matches_policy_loss(case, agg, backend, device, gen):
    batch, opts = make_batch(gen, case, device=device)
    check_case(batch, dict(opts, agg=agg), backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["everything", "gspo-everything"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_logits_odd_sizes(dtype, temperature, case, backend, device, gen):
    batch, opts = make_batch(gen, case, S=3, T=37, V=4093, dtype=dtype, device=device, temperature=temperature)
    check_case(batch, dict(opts, agg="seq-mean-token-mean"), backend, temperature=temperature)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocabulary(backend, device, gen):
    batch, opts = make_batch(gen, "everything", S=3, T=16, V=151_936, dtype=torch.bfloat16, device=device)
    check_case(batch, opts, backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend, device, gen):
    batch, opts = make_batch(gen, "everything", S=4, T=9, V=1021, device=device)
    logits, tokens = batch["logits"], batch["tokens"]
    logits[0] *= 1e4 / 3  # +-1e4
    logits[1, :, :500] = float("-inf")  # banned tokens, never sampled
    tokens[1] = torch.randint(500, 1021, (9,), generator=gen).to(device)
    logits[3, 2] = float("-inf")  # one finite entry, which was sampled: log-prob 0
    logits[3, 2, 7], tokens[3, 2] = 2.0, 7
    ours = check_case(batch, opts, backend)
    assert torch.isfinite(ours[0]) and torch.isfinite(ours[2]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_padding_garbage_is_never_read(level, backend, gen):
    """NaN logits, NaN inputs and out-of-vocabulary ids (-100) at masked positions change nothing."""
    batch, opts = make_batch(gen, "everything")
    opts = dict(opts, ratio_level=level, agg="seq-mean-token-sum")
    clean = evaluate(grpo_loss, batch, opts, backend=backend)
    mask = batch["mask"]
    dirty = dict(batch, logits=batch["logits"].masked_fill(~mask[..., None], float("nan")),
                 tokens=batch["tokens"].masked_fill(~mask, -100),
                 old_logp=batch["old_logp"].masked_fill(~mask, float("nan")),
                 advantages=batch["advantages"].masked_fill(~mask, float("inf")))
    dirty_opts = {k: v.masked_fill(~mask, float("nan")) if isinstance(v, torch.Tensor) else v for k, v in opts.items()}
    loss, metrics, grad = evaluate(grpo_loss, dirty, dirty_opts, backend=backend)
    torch.testing.assert_close(loss, clean[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, clean[2], rtol=1e-6, atol=1e-7)
    assert (grad[~mask] == 0).all()
    for key, value in metrics.items():
        torch.testing.assert_close(value, clean[1][key], rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_all_masked_batch_gives_zero_loss_and_gradient(level, backend, gen):
    batch, opts = make_batch(gen, "everything")
    batch["mask"] = torch.zeros_like(batch["mask"])
    loss, metrics, grad = evaluate(grpo_loss, batch, dict(opts, ratio_level=level), backend=backend)
    assert loss.item() == 0.0 and (grad == 0).all() and metrics["tokens"] == 0
    assert all(torch.isfinite(v) for v in metrics.values())


SPLITS = [slice(0, 2), slice(2, 3), slice(3, 7)]  # uneven; the middle one is just the empty sequence


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_micro_batches_with_global_denominators_sum_to_the_full_batch(agg, level, backend, device, gen):
    """Gradient accumulation through the kernel: sum of micro-batch losses/grads = full batch."""
    batch, opts = make_batch(gen, "everything", device=device)
    opts = dict(opts, agg=agg, ratio_level=level)
    mask = batch["mask"]
    assert not mask[2].any()
    full_loss, _, full_grad = evaluate(grpo_loss, batch, opts, backend=backend)
    denominators: dict[str, torch.Tensor] = {}
    for rows in SPLITS:
        for name, count in local_denominators(mask[rows], agg).items():
            denominators[name] = denominators.get(name, 0) + count
    micro_loss, micro_grads = 0.0, []
    for rows in SPLITS:
        part = {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        part_opts = {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in opts.items()}
        loss, _, grad = evaluate(grpo_loss, part, dict(part_opts, **denominators), backend=backend)
        micro_loss = micro_loss + loss
        micro_grads.append(grad)
    torch.testing.assert_close(micro_loss, full_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.cat(micro_grads), full_grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_inplace_backward_gives_the_same_gradients(level, backend, gen):
    """lm_head pattern: logits = h @ W; d logits may overwrite the logits buffer."""
    batch, opts = make_batch(gen, "everything", V=301)
    spec, tensors = split_options(dict(opts, ratio_level=level))
    h = torch.randn(7, 13, 24, generator=gen)
    W = torch.randn(24, 301, generator=gen) / 3
    grads = {}
    for inplace in (False, True):
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
        loss, _ = grpo_loss(hh @ WW, batch["tokens"], batch["old_logp"], batch["advantages"], batch["mask"], spec,
                            backend=backend, inplace_backward=inplace, **tensors)
        loss.backward()
        grads[inplace] = (hh.grad, WW.grad)
    torch.testing.assert_close(grads[True], grads[False], rtol=0, atol=0)


def test_kernel_terms_match_the_reference_per_token(gen):
    """r1mega_kernels.grpo_loss directly: per-token loss, dL/dlogp and flags vs autograd on policy_loss."""
    batch, opts = make_batch(gen, "everything", device=KERNEL_DEVICE)
    mask = batch["mask"]
    adv = batch["advantages"].contiguous()
    out = grpo_forward(batch["logits"], batch["tokens"], mask, batch["old_logp"], adv,
                       ref_logp=opts["ref_logp"], rollout_logp=opts["rollout_logp"], temperature=0.8,
                       eps_low=0.15, eps_high=0.3, dual_clip=2.0, kl_estimator="k3+", kl_coef=0.05, kl_clamp=10.0,
                       tis_cap=1.5, rows_per_program=4, block_v=64)
    logp = out.logp.clone().requires_grad_()
    # Summed (not averaged) per-token losses: the gradient w.r.t. logp is dL_t/dlogp_t itself.
    n = int(mask.sum())
    spec, tensors = split_options(dict(opts, global_tokens=1.0))
    assert spec.token_terms() == dict(eps_low=0.15, eps_high=0.3, dual_clip=2.0, kl_estimator="k3+", kl_coef=0.05,
                                      kl_clamp=10.0, tis_cap=1.5)  # the kernel's keywords above
    loss, metrics = policy_loss(logp, batch["old_logp"], adv, mask, spec, **tensors)
    (dloss,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(out.loss.sum(), loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.dloss, dloss, rtol=1e-5, atol=1e-6)
    assert ((out.clip_flags & 1) != 0).sum() == round(metrics["clip_frac_low"].item() * n)
    assert ((out.clip_flags & 2) != 0).sum() == round(metrics["clip_frac_high"].item() * n)
    assert ((out.clip_flags & 4) != 0).sum() == round(metrics["dual_clip_frac"].item() * n)
    assert (out.loss[~mask] == 0).all() and (out.dloss[~mask] == 0).all() and (out.clip_flags[~mask] == 0).all()


# Options LossSpec refuses at construction: no implementation ever sees them, and none takes
# them as keywords any more.
BAD_OPTIONS = [
    dict(agg="mean"),
    dict(kl_estimator="low_var_kl"),
    dict(ratio_level="seq"),
    dict(eps_low=-0.1),
    dict(eps_high="wide"),
    dict(dual_clip=1.0),
    dict(tis_cap=0.0),
    dict(kl_clamp=-1.0),
    dict(agg="seq-mean-token-sum", norm_length=4),
]

# Valid specs refused at the call (the optional tensors they need, the denominators): every
# implementation takes the same LossSpec and refuses it with policy_loss's message.
BAD_CALLS = [
    dict(tis_cap=0.5, rollout_logp=torch.zeros(3, 4), global_tokens=0),
    dict(tis_cap=2.0),
    dict(kl_coef=0.1),
    dict(global_tokens=0),
    dict(global_tokens=float("nan")),
    dict(global_sequences=4),
    dict(agg="seq-mean-token-sum", global_tokens=4),
    dict(agg="seq-mean-token-mean", global_sequences=-2),
]


@pytest.mark.parametrize("overrides", BAD_OPTIONS, ids=[",".join(d) for d in BAD_OPTIONS])
def test_bad_options_are_refused_by_loss_spec(overrides):
    S, T = 3, 4
    args = (torch.zeros(S, T), torch.zeros(S), torch.ones(S, T))
    with pytest.raises(LossSpecError) as refused:
        LossSpec(**overrides)
    assert refused.value.field in overrides and refused.value.field in str(refused.value)
    with pytest.raises(TypeError):  # the old keywords are gone
        grpo_loss(torch.zeros(S, T, 5), torch.zeros(S, T, dtype=torch.long), *args, **overrides)


@pytest.mark.parametrize("overrides", BAD_CALLS, ids=[",".join(d) for d in BAD_CALLS])
def test_bad_calls_raise_the_same_error_as_policy_loss(overrides):
    S, T = 3, 4
    args = (torch.zeros(S, T), torch.zeros(S), torch.ones(S, T))
    spec, rest = split_options(overrides)
    with pytest.raises(ValueError) as expected:
        policy_loss(torch.zeros(S, T), *args, spec, **rest)
    for backend in ("torch", None):
        with pytest.raises(ValueError) as ours:
            grpo_loss(torch.zeros(S, T, 5), torch.zeros(S, T, dtype=torch.long), *args, spec, backend=backend, **rest)
        assert str(ours.value) == str(expected.value)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(logits=torch.zeros(3, 5)), "logits must be a 3-D floating tensor"),
        (dict(tokens=torch.zeros(3, 5, dtype=torch.long)), "tokens has shape"),
        (dict(old_logp=torch.zeros(3, 5)), "old_logp has shape"),
        (dict(mask=torch.ones(4, 4)), "mask has shape"),
        (dict(advantages=torch.zeros(4)), "advantages has shape"),
        (dict(ref_logp=torch.zeros(3, 2)), "ref_logp has shape"),
        (dict(temperature=0.0), "temperature"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(logits=torch.zeros(3, 4, 5, dtype=torch.float64), backend="triton"), "cannot run here"),
    ],
)
def test_bad_inputs_name_the_argument(overrides, match):
    args = dict(logits=torch.zeros(3, 4, 5), tokens=torch.zeros(3, 4, dtype=torch.long), old_logp=torch.zeros(3, 4),
                advantages=torch.zeros(3), mask=torch.ones(3, 4)) | overrides
    positional = [args.pop(k) for k in ("logits", "tokens", "old_logp", "advantages", "mask")]
    with pytest.raises(ValueError, match=match):
        grpo_loss(*positional, **args)


def test_kernel_launcher_errors_name_the_argument():
    x, y, f = torch.zeros(2, 3, 9), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3)
    v = torch.ones(2, 3, dtype=torch.bool)
    cases = [
        (lambda: grpo_forward(x, y, v.float(), f, f), "valid must have dtype in"),
        (lambda: grpo_forward(x, y, v, f[:, :2], f), r"old_logp must have shape \(2, 3\) like tokens"),
        (lambda: grpo_forward(x, y, v, f, f.long()), "advantages must have dtype in"),
        (lambda: grpo_forward(x, y, v, f, f.t().contiguous().t()), "advantages must be contiguous"),
        (lambda: grpo_forward(x, y, v, f, f, ref_logp=f[0]), "ref_logp must have shape"),
        (lambda: grpo_forward(x, y, v, f, f, kl_estimator="k4"), "kl_estimator must be one of"),
        (lambda: grpo_forward(x, y, v, f, f, kl_coef=1.0), "kl_coef=1.0 needs ref_logp"),
        (lambda: grpo_forward(x, y, v, f, f, tis_cap=2.0), "tis_cap needs rollout_logp"),
        (lambda: grpo_forward(x, y, v, f, f, dual_clip=0.5), "dual_clip must be > 1"),
        (lambda: grpo_token_terms(f, v, f, f, seq_log_ratio=f[:1]), "seq_log_ratio must have shape"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


_MEMORY_PROBE = textwrap.dedent(
    """
    import json, re, sys, torch
    from r1mega.algo import LossSpec
    from r1mega.ops import grpo_loss, reference_grpo_loss
    torch.set_num_threads(1)
    which, S, T, V = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

    def kib(key):  # this process's current (VmRSS) or peak (VmHWM) resident memory
        return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))

    def step(n):
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(S if n else 1, T if n else 4, V, generator=gen).requires_grad_()
        shape = logits.shape[:2]
        args = (torch.randint(0, V, shape, generator=gen), torch.randn(shape, generator=gen) - 5,
                torch.randn(shape[0], generator=gen), torch.ones(shape, dtype=torch.bool))
        spec, kw = LossSpec(dual_clip=3.0), dict(temperature=0.9)
        before = kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak to the current resident size
        if which == "reference":
            loss, _ = reference_grpo_loss(logits, *args, spec, **kw)
        else:
            loss, _ = grpo_loss(logits, *args, spec, backend="torch", **kw)
        loss.backward()
        return (kib("VmHWM") - before) * 1024, logits.numel() * logits.element_size()

    step(0)  # imports and lazy initialisation happen outside the measured step
    extra, logits_bytes = step(1)
    print(json.dumps(dict(extra_bytes=extra, logits_bytes=logits_bytes)))
    """
)


def measure_peak_extra_memory(which: str, S: int, T: int, V: int, glibc_fixed_threshold: bool = True) -> dict:
    """Peak resident memory of fwd+bwd above what was resident before it, in a fresh process.

    torch has no CPU peak-memory counter, so this reads Linux's per-process peak resident size
    (VmHWM), reset to the current size right before the step (/proc/self/clear_refs). The
    gradient (logits.grad) is part of every variant. glibc's malloc is given a fixed mmap
    threshold: with its default dynamic one it keeps some freed blocks of the size of a torch
    chunk temporary resident, which adds a varying 20-200 MiB to the torch backend's figure
    (measured) and nothing to the reference's.
    """
    env = dict(os.environ)
    if glibc_fixed_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, which, str(S), str(T), str(V)],
                          capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS accounting")
def test_torch_backend_peak_memory_stays_below_the_eager_reference():
    """2048 tokens x 32k vocabulary, float32: the reference makes several [N, V] float32 tensors."""
    S, T, V = 4, 512, 32_000
    ref = measure_peak_extra_memory("reference", S, T, V)
    ours = measure_peak_extra_memory("torch", S, T, V)
    mib = 2.0**20
    print(f"logits {ref['logits_bytes'] / mib:.0f} MiB; peak extra: reference {ref['extra_bytes'] / mib:.0f} MiB, "
          f"torch backend {ours['extra_bytes'] / mib:.0f} MiB")
    # Ours: the gradient (one logits-sized buffer) plus two 16 MiB chunk temporaries; the
    # reference: logits / temperature, the log-softmax and its gradients, three logits-sized buffers.
    assert ours["extra_bytes"] < 1.25 * ours["logits_bytes"]
    assert ours["extra_bytes"] < 0.5 * ref["extra_bytes"]
