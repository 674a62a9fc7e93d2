"""linear_grpo_loss (r1mega.ops.linear) against the eager reference, and its peak memory.

The reference is r1mega.ops.reference_grpo_loss of the eager logits ``hidden @ weight.T``. Loss,
every metric, d loss / d hidden and d loss / d weight are compared as in test_kernels_grpo_loss:
our error against the float64 reference (float64 hidden and weight holding the same values) at
most twice the eager reference's error at the input precision, plus the rounding floors measured
there. Sizes are odd (H, V, the token count) and the chunks do not divide the token count. The
tensor-parallel variant (``group``) runs in tests/workers/vocab_parallel_tp.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from r1mega.algo import AGG_MODES, local_denominators, policy_loss
from r1mega.ops import linear_grpo_loss, reference_grpo_loss, reference_token_logprobs
from tests.loss_cases import split_options
from tests.test_kernels_grpo_loss import (
    SPLITS,
    make_batch,
    reference_token_logprobs_f32,
)
from tests.test_kernels_logprob import (
    BACKENDS,
    DEVICES,
    assert_within_torch_error,
    max_error,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's masked lanes


TEMPERATURE = 0.8  # the batches' log-probs are made at this temperature; every call here uses it


def make_linear_batch(gen, case, *, S=3, T=19, H=45, V=1031, dtype=torch.float32, device="cpu",
                      temperature=TEMPERATURE):
    """(hidden, weight, batch, opts): test_kernels_grpo_loss.make_batch's masks and options, with
    old/ref/rollout log-probs placed around the log-probs of hidden @ weight.T (logit scale ~3).

    batch["logits"] holds the float64 logits of the (rounded) hidden and weight, for the floors.
    """
    hidden = torch.randn(S, T, H, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=gen, dtype=torch.float64) * (3.0 / H**0.5)).to(dtype)
    batch, opts = make_batch(gen, case, S=S, T=T, V=V, temperature=temperature)
    logits = hidden.double() @ weight.double().T
    shift = reference_token_logprobs_f32(logits, batch["tokens"], temperature) - reference_token_logprobs_f32(
        batch["logits"], batch["tokens"], temperature)
    batch = dict(batch, logits=logits, old_logp=batch["old_logp"] + shift)
    opts = {k: v + shift if k in ("ref_logp", "rollout_logp") else v for k, v in opts.items()}
    move = (lambda x: x.to(device) if isinstance(x, torch.Tensor) else x)
    return (hidden.to(device), weight.to(device), {k: move(v) for k, v in batch.items()},
            {k: move(v) for k, v in opts.items()})


def eager_linear_grpo_loss(hidden, weight, *args, **kwargs):
    """The reference: the full logits in eager torch, then reference_grpo_loss."""
    return reference_grpo_loss(hidden @ weight.T, *args, **kwargs)


def evaluate_linear(fn, hidden, weight, batch, opts, *, cast=None, **kwargs):
    """(loss, metrics, d loss / d hidden, d loss / d weight); ``cast`` converts every float input.
    The loss options of ``opts`` are fn's LossSpec, the rest (tensors, denominators) its arguments."""
    cast = cast or (lambda x: x)
    kwargs.setdefault("temperature", TEMPERATURE)
    h = cast(hidden).detach().clone().requires_grad_()
    w = cast(weight).detach().clone().requires_grad_()
    floats = {k: cast(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in opts.items()}
    spec, rest = split_options(floats)
    loss, metrics = fn(h, w, batch["tokens"], cast(batch["old_logp"]), cast(batch["advantages"]), batch["mask"],
                       spec, **rest, **kwargs)
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    return loss.detach(), metrics, grad_h, grad_w


def rounding_floors(hidden, weight, batch, opts, temperature, ref, ulps=2.0) -> dict[str, float]:
    """How far the float64 results move under the float32 rounding any implementation makes.

    Two sources, each applied to the float64 reference and measured (the max over the patterns):
    every log-prob moved by ``ulps`` float32 ulps (as test_kernels_grpo_loss.logp_rounding_floors:
    signs all +, all -, random), and every logit moved by |float32 GEMM - exact| with random signs
    (two patterns). The second matters here: hidden @ weight.T rounds each logit differently
    depending on how the BLAS blocks the product (ours runs it per chunk, eager on the whole batch).
    For the gradients the first is the larger: in float32, ratio = exp(logp - old) inherits the
    rounding of log-probs around -10 (ulp ~1e-6) and d loss / d logits scales with the ratio, so
    whichever evaluation is luckier on the few largest-gradient tokens differs by ~3x.
    """
    exact = hidden.double() @ weight.double().T
    logits_error = ((hidden.float() @ weight.float().T).double() - exact).abs()
    logp = reference_token_logprobs(exact, batch["tokens"], temperature=temperature)
    logp_step = ulps * torch.finfo(torch.float32).eps * logp.abs().clamp(min=1.0)

    def random_signs(shape, seed):
        signs = torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(seed)).double() * 2 - 1
        return signs.to(exact.device)

    zero_logits, zero_logp = torch.zeros_like(exact), torch.zeros_like(logp)
    patterns = [(logits_error * random_signs(exact.shape, seed), zero_logp) for seed in (0, 1)]
    patterns += [(zero_logits, signs * logp_step) for signs in (1.0, -1.0, random_signs(logp.shape, 2))]
    floors = dict.fromkeys(["loss", "grad_hidden", "grad_weight", *ref[1]], 0.0)
    for logits_offset, logp_offset in patterns:
        def moved(h, w, tokens, old_logp, advantages, mask, spec, *, temperature, logits_offset=logits_offset,
                  logp_offset=logp_offset, **kwargs):
            moved_logp = reference_token_logprobs(h @ w.T + logits_offset, tokens, temperature=temperature)
            return policy_loss(moved_logp + logp_offset, old_logp, advantages, mask, spec, **kwargs)

        out = evaluate_linear(moved, hidden, weight, batch, opts, cast=torch.Tensor.double, temperature=temperature)
        for key, a, b in [("loss", out[0], ref[0]), ("grad_hidden", out[2], ref[2]),
                          ("grad_weight", out[3], ref[3])] + [(k, out[1][k], ref[1][k]) for k in ref[1]]:
            floors[key] = max(floors[key], max_error(a, b))
    return floors


def check_linear_case(hidden, weight, batch, opts, temperature=TEMPERATURE, **kwargs):
    """Ours vs the eager reference at the same precision vs float64; returns the measured errors."""
    ours = evaluate_linear(linear_grpo_loss, hidden, weight, batch, opts, temperature=temperature, **kwargs)
    same = evaluate_linear(eager_linear_grpo_loss, hidden, weight, batch, opts, temperature=temperature)
    ref = evaluate_linear(eager_linear_grpo_loss, hidden, weight, batch, opts, cast=torch.Tensor.double,
                          temperature=temperature)
    floors = rounding_floors(hidden, weight, batch, opts, temperature, ref)
    assert ours[0].dtype == same[0].dtype
    assert ours[2].dtype == hidden.dtype and ours[3].dtype == weight.dtype
    assert list(ours[1]) == list(same[1]), "metrics keys and order"
    errors = {
        "loss": assert_within_torch_error("loss", ours[0], same[0], ref[0], floor=floors["loss"]),
        "grad_hidden": assert_within_torch_error("grad_hidden", ours[2], same[2], ref[2], floor=floors["grad_hidden"]),
        "grad_weight": assert_within_torch_error("grad_weight", ours[3], same[3], ref[3], floor=floors["grad_weight"]),
    }
    for key in same[1]:
        assert ours[1][key].dtype == same[1][key].dtype and not ours[1][key].requires_grad, key
        errors[key] = assert_within_torch_error(f"metric {key}", ours[1][key], same[1][key], ref[1][key],
                                                floor=floors[key])
    print(json.dumps({k: [f"{e:.3g}" for e in v] + [f"floor {floors[k]:.3g}"] for k, v in errors.items()}))
    return ours


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, agg", [("everything", "token-mean"), ("gspo-everything", "seq-mean-token-mean")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_eager_reference(dtype, case, agg, backend, device, gen):
    """57 tokens (41 unmasked-ish), H = 45, V = 1031, chunks of 17: nothing divides anything."""
    hidden, weight, batch, opts = make_linear_batch(gen, case, dtype=dtype, device=device)
    check_linear_case(hidden, weight, batch, dict(opts, agg=agg), backend=backend, chunk_tokens=17)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_every_aggregation(agg, backend, gen):
    hidden, weight, batch, opts = make_linear_batch(gen, "defaults", S=4, T=7, H=16, V=129)
    check_linear_case(hidden, weight, batch, dict(opts, agg=agg), backend=backend, chunk_tokens=5)


@pytest.mark.parametrize("backend, dtype, tolerance", [("torch", torch.float64, 1e-12), ("triton", torch.float32, 1e-5)])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_chunk_size_does_not_change_the_result(level, backend, dtype, tolerance, gen):
    """One token per chunk, a chunk size dividing nothing, and one chunk for everything.

    In float64 the results must agree to rounding; in float32 the logits GEMM of a chunk of one
    token rounds differently from a larger one (see rounding_floors), hence the looser tolerance.
    """
    hidden, weight, batch, opts = make_linear_batch(gen, "everything", S=3, T=9, H=12, V=101, dtype=dtype)
    opts = dict(opts, ratio_level=level)
    results = [evaluate_linear(linear_grpo_loss, hidden, weight, batch, opts, backend=backend, chunk_tokens=c)
               for c in (1, 4, 10_000)]
    for loss, metrics, grad_h, grad_w in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(grad_h, results[0][2], rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(grad_w, results[0][3], rtol=tolerance, atol=tolerance)
        for key, value in metrics.items():
            torch.testing.assert_close(value, results[0][1][key], rtol=tolerance, atol=tolerance, msg=key)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_masked_positions_are_never_read(level, backend, gen):
    """NaN hidden states, NaN inputs and -100 ids at masked positions change nothing; their grad is 0."""
    hidden, weight, batch, opts = make_linear_batch(gen, "everything", S=4, T=6, H=10, V=67)
    opts = dict(opts, ratio_level=level, agg="seq-mean-token-sum")
    clean = evaluate_linear(linear_grpo_loss, hidden, weight, batch, opts, backend=backend, chunk_tokens=4)
    mask = batch["mask"]
    dirty = dict(batch, tokens=batch["tokens"].masked_fill(~mask, -100),
                 old_logp=batch["old_logp"].masked_fill(~mask, float("nan")),
                 advantages=batch["advantages"].masked_fill(~mask, float("inf")))  # per-token in "everything"
    dirty_opts = {k: v.masked_fill(~mask, float("nan")) if isinstance(v, torch.Tensor) else v for k, v in opts.items()}
    nan_hidden = hidden.masked_fill(~mask[..., None], float("nan"))
    loss, metrics, grad_h, grad_w = evaluate_linear(linear_grpo_loss, nan_hidden, weight, dirty, dirty_opts,
                                                    backend=backend, chunk_tokens=4)
    torch.testing.assert_close(loss, clean[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_w, clean[3], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_h, clean[2], rtol=1e-6, atol=1e-7)
    assert (grad_h[~mask] == 0).all()
    for key, value in metrics.items():
        torch.testing.assert_close(value, clean[1][key], rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batches_with_global_denominators_sum_to_the_full_batch(agg, level, gen):
    """Gradient accumulation: the micro-batches' losses and weight gradients sum to the full batch's.

    In float64 (torch backend), so that the check is exact to rounding, whatever the chunking.
    """
    hidden, weight, batch, opts = make_linear_batch(gen, "everything", S=7, T=5, H=10, V=67, dtype=torch.float64)
    opts = dict(opts, agg=agg, ratio_level=level)
    full_loss, _, full_grad_h, full_grad_w = evaluate_linear(linear_grpo_loss, hidden, weight, batch, opts,
                                                             backend="torch", chunk_tokens=6)
    denominators: dict[str, torch.Tensor] = {}
    for rows in SPLITS:
        for name, count in local_denominators(batch["mask"][rows], agg).items():
            denominators[name] = denominators.get(name, 0) + count
    loss_sum, grad_w_sum, grads_h = 0.0, torch.zeros_like(weight), []
    for rows in SPLITS:
        part = {k: v[rows] for k, v in batch.items()}
        part_opts = {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in opts.items()}
        loss, _, grad_h, grad_w = evaluate_linear(linear_grpo_loss, hidden[rows], weight, part,
                                                  dict(part_opts, **denominators), backend="torch", chunk_tokens=6)
        loss_sum, grad_w_sum = loss_sum + loss, grad_w_sum + grad_w
        grads_h.append(grad_h)
    torch.testing.assert_close(loss_sum, full_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.cat(grads_h), full_grad_h, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_w_sum, full_grad_w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_only_for_the_inputs_that_require_them(backend, gen):
    hidden, weight, batch, opts = make_linear_batch(gen, "defaults", S=2, T=5, H=8, V=33)
    spec, tensors = split_options(opts)
    args = (batch["tokens"], batch["old_logp"], batch["advantages"], batch["mask"], spec)
    both = evaluate_linear(linear_grpo_loss, hidden, weight, batch, opts, backend=backend)
    assert both[2].abs().sum() > 0 and both[3].abs().sum() > 0
    h = hidden.clone().requires_grad_()
    loss, _ = linear_grpo_loss(h, weight, *args, backend=backend, temperature=TEMPERATURE, **tensors)
    (2.0 * loss).backward()  # the stored gradient is scaled by the incoming one
    torch.testing.assert_close(h.grad, 2.0 * both[2], rtol=1e-6, atol=0)
    w = weight.clone().requires_grad_()
    loss, _ = linear_grpo_loss(hidden, w, *args, backend=backend, temperature=TEMPERATURE, **tensors)
    loss.backward()
    torch.testing.assert_close(w.grad, both[3], rtol=0, atol=0)
    with torch.no_grad():  # leaves that require grad, but no graph: no gradient work either
        loss, _ = linear_grpo_loss(hidden.clone().requires_grad_(), weight, *args, backend=backend,
                                   temperature=TEMPERATURE, **tensors)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, both[0], rtol=0, atol=0)


def test_second_backward_through_the_same_graph_fails_loudly(gen):
    hidden, weight, batch, _ = make_linear_batch(gen, "defaults", S=2, T=4, H=8, V=33)
    h = hidden.clone().requires_grad_()
    loss, _ = linear_grpo_loss(h, weight, batch["tokens"], batch["old_logp"], batch["advantages"], batch["mask"],
                               backend="torch", temperature=TEMPERATURE)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_float64_runs_on_the_torch_backend(gen):
    hidden, weight, batch, opts = make_linear_batch(gen, "everything", S=3, T=5, H=8, V=41, dtype=torch.float64)
    ours = evaluate_linear(linear_grpo_loss, hidden, weight, batch, opts, chunk_tokens=4)
    ref = evaluate_linear(eager_linear_grpo_loss, hidden, weight, batch, opts)
    assert ours[0].dtype == torch.float64
    for a, b in zip(ours[:1] + ours[2:], ref[:1] + ref[2:]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(hidden=torch.zeros(3, 8)), "hidden must be a 3-D floating tensor"),
        (dict(weight=torch.zeros(7, 9)), r"weight must be \[V, H\] with H = 8"),
        (dict(weight=torch.zeros(7, 8, dtype=torch.float64)), "must have hidden's dtype"),
        (dict(tokens=torch.zeros(3, 5)), "tokens must be an integer tensor"),
        (dict(tokens=torch.zeros(3, 5, dtype=torch.long)), "tokens has shape"),
        (dict(old_logp=torch.zeros(3, 5)), "old_logp has shape"),
        (dict(mask=torch.ones(4, 4)), "mask has shape"),
        (dict(advantages=torch.zeros(4)), "advantages has shape"),
        (dict(chunk_tokens=0), "chunk_tokens must be an int >= 1"),
        (dict(temperature=0.0), "temperature"),
        (dict(agg="mean"), "agg must be one of"),  # refused by LossSpec(agg="mean"), before the call
        (dict(backend="cuda"), "backend must be one of"),
    ],
)
def test_bad_inputs_name_the_argument(overrides, match):
    args = dict(hidden=torch.zeros(3, 4, 8), weight=torch.zeros(7, 8), tokens=torch.zeros(3, 4, dtype=torch.long),
                old_logp=torch.zeros(3, 4), advantages=torch.zeros(3), mask=torch.ones(3, 4)) | overrides
    positional = [args.pop(k) for k in ("hidden", "weight", "tokens", "old_logp", "advantages", "mask")]
    with pytest.raises(ValueError, match=match):
        spec, rest = split_options(args)
        linear_grpo_loss(*positional, spec, **rest)


# Peak memory, measured like test_kernels_grpo_loss.measure_peak_extra_memory: a fresh process,
# Linux's peak resident size (VmHWM) reset right before the step, glibc's mmap threshold fixed.
_LINEAR_MEMORY_PROBE = textwrap.dedent(
    """
    import json, re, sys, torch
    from r1mega.algo import LossSpec
    from r1mega.ops import linear_grpo_loss, reference_grpo_loss
    torch.set_num_threads(1)
    which, S, T, H, V = sys.argv[1], *map(int, sys.argv[2:])

    def kib(key):
        return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))

    def step(n):
        gen = torch.Generator().manual_seed(0)
        s, t = (S, T) if n else (1, 4)
        hidden = torch.randn(s, t, H, generator=gen).requires_grad_()
        weight = (torch.randn(V, H, generator=gen) * 3 / H**0.5).requires_grad_()
        args = (torch.randint(0, V, (s, t), generator=gen), torch.randn(s, t, generator=gen) - 10,
                torch.randn(s, generator=gen), torch.ones(s, t, dtype=torch.bool))
        spec, kw = LossSpec(dual_clip=3.0), dict(temperature=0.9)
        before = kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        if which == "reference":
            loss, _ = reference_grpo_loss(hidden @ weight.T, *args, spec, **kw)
        else:
            loss, _ = linear_grpo_loss(hidden, weight, *args, spec, backend="torch", **kw)
        loss.backward()
        return (kib("VmHWM") - before) * 1024, s * t * V * 4

    step(0)
    extra, logits_bytes = step(1)
    print(json.dumps(dict(extra_bytes=extra, logits_bytes=logits_bytes)))
    """
)


def measure_linear_peak_memory(which: str, S: int, T: int, H: int, V: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    done = subprocess.run([sys.executable, "-c", _LINEAR_MEMORY_PROBE, which, str(S), str(T), str(H), str(V)],
                          capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS accounting")
def test_peak_memory_is_a_small_fraction_of_eager():
    """2048 tokens x 32k vocabulary, H = 64, float32: eager holds several [N, V] float32 tensors,
    the fused-linear path one chunk of logits (32 MiB by default on CPU) plus chunk temporaries."""
    S, T, H, V = 4, 512, 64, 32_000
    ref = measure_linear_peak_memory("reference", S, T, H, V)
    ours = measure_linear_peak_memory("linear", S, T, H, V)
    mib = 2.0**20
    print(f"logits {ref['logits_bytes'] / mib:.0f} MiB; peak extra: eager {ref['extra_bytes'] / mib:.0f} MiB, "
          f"linear_grpo_loss {ours['extra_bytes'] / mib:.0f} MiB")
    assert ours["extra_bytes"] < 0.5 * ours["logits_bytes"]
    assert ours["extra_bytes"] < 0.25 * ref["extra_bytes"]
