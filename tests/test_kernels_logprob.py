"""Token log-probs and entropies (r1mega.ops / r1mega_kernels.logprob) against float64 references.

Tolerances are measured, not chosen: for every output, our error against the float64 reference
(computed from the same input values) must be at most twice the error of plain torch at the same
input precision (the reference function on the same low-precision tensors), plus a rounding-noise
floor of two float32 ulps of the output's scale. Inputs are fresh random draws each run (the
seed is printed, so a failure can be replayed with R1MEGA_TEST_SEED=<seed>).
"""

from __future__ import annotations

import math

import pytest
import torch
from r1mega_kernels.logprob import logprob_backward, logprob_forward  # after conftest set TRITON_INTERPRET

from r1mega.ops import (
    reference_token_logprobs,
    reference_token_logprobs_and_entropy,
    resolve_backend,
    token_logprobs,
    token_logprobs_and_entropy,
)
from r1mega.utils.triton_env import interpreter_on

# The CPU interpreter evaluates masked-off lanes and both sides of tl.where with numpy, which
# warns about log(0) and inf - inf there; a GPU does the same IEEE arithmetic silently.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

BACKENDS = ["triton", "torch"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# Where tests that launch kernels directly put their tensors.
KERNEL_DEVICE = "cpu" if interpreter_on() or not torch.cuda.is_available() else "cuda"
FLOAT32_ULP = torch.finfo(torch.float32).eps


def max_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Max |x - reference| over finite reference entries; inf if the non-finite entries differ."""
    x, reference = x.detach().double().cpu(), reference.detach().double().cpu()
    finite = torch.isfinite(reference)
    if not torch.equal(x[~finite].nan_to_num(nan=1.5), reference[~finite].nan_to_num(nan=1.5)):
        return math.inf
    return (x[finite] - reference[finite]).abs().max().item() if finite.any() else 0.0


def assert_within_torch_error(name: str, ours: torch.Tensor, torch_same: torch.Tensor, reference: torch.Tensor,
                              floor: float = 0.0, ulps: float = 2.0) -> tuple[float, float]:
    """Our error vs float64 <= 2 x torch's error at the same precision + a rounding floor.

    The floor is ``floor`` (what rounding the inputs moves the result by) plus ``ulps`` float32
    ulps of the reference's scale (the float32 result's own rounding, which comes on top: a
    metric that flips one token of 53 is off by 1/53 plus its float32 rounding).
    """
    assert ours.shape == reference.shape, (name, ours.shape, reference.shape)
    ours_err, torch_err = max_error(ours, reference), max_error(torch_same, reference)
    finite = reference[torch.isfinite(reference)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    floor = floor + ulps * FLOAT32_ULP * max(scale, 1.0)
    assert ours_err <= 2.0 * torch_err + floor, (
        f"{name}: our error {ours_err:.3g} > 2 x torch's {torch_err:.3g} + floor {floor:.3g} (scale {scale:.3g})"
    )
    return ours_err, torch_err


def random_logits(gen, shape, vocab, dtype, device="cpu", scale=3.0):
    logits = scale * torch.randn(*shape, vocab, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, vocab, tuple(shape), generator=gen)
    return logits.to(dtype).to(device), tokens.to(device)


def run(fn, logits, tokens, grads, **kwargs):
    """Outputs of fn and d(sum_i grads_i . outputs_i)/d(logits)."""
    x = logits.detach().clone().requires_grad_()
    out = fn(x, tokens, **kwargs)
    out = out if isinstance(out, tuple) else (out,)
    (grad,) = torch.autograd.grad(sum((o * g).sum() for o, g in zip(out, grads)), x)
    return [o.detach() for o in out], grad


def check_against_references(logits, tokens, temperature, backend, gen, with_entropy=True):
    """Forward and backward of ours vs torch at the same precision vs float64; returns the errors."""
    fn = token_logprobs_and_entropy if with_entropy else token_logprobs
    ref_fn = reference_token_logprobs_and_entropy if with_entropy else reference_token_logprobs
    grads = [torch.randn(tokens.shape, generator=gen).to(logits.device) for _ in range(2 if with_entropy else 1)]
    ours, ours_grad = run(fn, logits, tokens, grads, temperature=temperature, backend=backend)
    same, same_grad = run(ref_fn, logits, tokens, grads, temperature=temperature)
    ref, ref_grad = run(ref_fn, logits.double(), tokens, [g.double() for g in grads], temperature=temperature)
    assert ours_grad.dtype == logits.dtype and all(o.dtype == s.dtype for o, s in zip(ours, same))
    errors = {}
    for name, a, b, c in zip(["logp", "entropy"], ours, same, ref):
        errors[name] = assert_within_torch_error(name, a, b, c)
    errors["grad"] = assert_within_torch_error("grad", ours_grad, same_grad, ref_grad)
    return errors


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_and_backward_match_float64_reference(dtype, temperature, backend, device, gen):
    logits, tokens = random_logits(gen, (3, 37), 4093, dtype, device)  # 111 tokens, odd vocabulary
    check_against_references(logits, tokens, temperature, backend, gen)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocabulary(backend, device, gen):
    logits, tokens = random_logits(gen, (2, 23), 151_936, torch.bfloat16, device)
    check_against_references(logits, tokens, 0.9, backend, gen)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_and_banned_logits(backend, device, gen):
    V = 1021
    logits, tokens = random_logits(gen, (4, 9), V, torch.float32)
    logits[0] *= 1e4 / 3  # logits of order +-1e4
    logits[1, :, : V // 2] = float("-inf")  # banned tokens
    tokens[1] = torch.randint(V // 2, V, (9,), generator=gen)
    logits[2, 3] = float("-inf")  # a row that is -inf except one entry, which is sampled
    logits[2, 3, 17], tokens[2, 3] = 5.0, 17
    logits[3, :, 0], logits[3, :, 1] = 1e4, -1e4
    errors = check_against_references(logits.to(device), tokens.to(device), 0.8, backend, gen)
    assert all(math.isfinite(ours) for ours, _ in errors.values())
    lp, ent = token_logprobs_and_entropy(logits, tokens, temperature=0.8, backend=backend)
    assert lp[2, 3].item() == 0.0 and ent[2, 3].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_logits_are_read_in_place(backend, gen):
    """logits[:, :-1] of a longer sequence (the causal-LM shift) needs no [N, V] copy."""
    full, _ = random_logits(gen, (3, 12), 333, torch.bfloat16)
    logits = full[:, :-1]
    assert not logits.is_contiguous()
    tokens = torch.randint(0, 333, (3, 11), generator=gen)
    check_against_references(logits, tokens, 1.0, backend, gen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(), (7,), (2, 3, 5)])
def test_any_leading_shape(shape, backend, gen):
    logits, tokens = random_logits(gen, shape, 65, torch.float32)
    check_against_references(logits, tokens, 1.3, backend, gen)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_writes_the_gradient_over_the_logits(backend, gen):
    """lm_head pattern: logits = h @ W; the backward may reuse the logits buffer for the gradient."""
    h = torch.randn(3, 17, 32, generator=gen)
    W = torch.randn(32, 501, generator=gen) / 4
    tokens = torch.randint(0, 501, (3, 17), generator=gen)
    grads = {}
    for inplace in (False, True):
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
        logits = hh @ WW
        lp, ent = token_logprobs_and_entropy(logits, tokens, temperature=0.9, backend=backend,
                                             inplace_backward=inplace)
        (lp.sum() + 0.3 * ent.sum()).backward(retain_graph=True)
        grads[inplace] = (hh.grad, WW.grad)
        if inplace:  # the saved logits were overwritten: a second backward must fail, not be wrong
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                lp.sum().backward()
    torch.testing.assert_close(grads[True], grads[False], rtol=0, atol=0)
    leaf = torch.randn(5, 77, generator=gen, requires_grad=True)
    token_logprobs(leaf, tokens[0, :5], backend=backend, inplace_backward=True).sum().backward()
    assert leaf.grad.data_ptr() == leaf.data_ptr()


@pytest.mark.parametrize("rows, block_v", [(1, 16), (4, 64), (64, 256), (16, 1024)])
def test_tile_sizes_do_not_change_results(rows, block_v, gen):
    """Many vocabulary tiles (the online max and entropy re-centring) and any rows per program."""
    logits, tokens = random_logits(gen, (5, 7), 257, torch.float32, KERNEL_DEVICE)
    logits[0, 0, 200] = 40.0  # the row maximum arrives in a late tile
    base = logprob_forward(logits, tokens, temperature=0.9, with_entropy=True, rows_per_program=32, block_v=512)
    out = logprob_forward(logits, tokens, temperature=0.9, with_entropy=True, rows_per_program=rows, block_v=block_v)
    for a, b in zip(out, base):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
    g, gh = (torch.randn(5, 7, generator=gen).to(KERNEL_DEVICE) for _ in range(2))
    kwargs = dict(entropy=out.entropy, grad_entropy=gh, temperature=0.9)
    base_grad = logprob_backward(logits, tokens, base.row_max, base.row_logsum, g, **kwargs)
    grad = logprob_backward(logits, tokens, out.row_max, out.row_logsum, g, rows_per_program=rows, block_v=block_v,
                            **kwargs)
    torch.testing.assert_close(grad, base_grad, rtol=2e-6, atol=2e-6)
    ref_lp, ref_ent = reference_token_logprobs_and_entropy(logits.double(), tokens, temperature=0.9)
    torch.testing.assert_close(out.logp.double(), ref_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ref_ent, rtol=0, atol=1e-5)


def test_valid_rows_are_skipped(gen):
    logits, tokens = random_logits(gen, (3, 8), 100, torch.float32, KERNEL_DEVICE)
    valid = (torch.rand(3, 8, generator=gen) > 0.4).to(KERNEL_DEVICE)
    logits[~valid] = float("nan")  # padding rows are never read...
    tokens[~valid] = -100  # ...nor their token ids
    out = logprob_forward(logits, tokens, with_entropy=True, valid=valid)
    ref_lp, ref_ent = reference_token_logprobs_and_entropy(logits[valid], tokens[valid])
    torch.testing.assert_close(out.logp[valid], ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy[valid], ref_ent, rtol=1e-5, atol=1e-5)
    assert (out.logp[~valid] == 0).all() and (out.entropy[~valid] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_token_has_log_prob_minus_inf(backend):
    logits = torch.zeros(2, 10)
    lp = token_logprobs(logits, torch.tensor([3, 10]), backend=backend)
    assert lp[0].item() == pytest.approx(-math.log(10)) and lp[1].item() == float("-inf")


def test_float64_logits_run_on_the_torch_backend(gen):
    logits, tokens = random_logits(gen, (2, 5), 50, torch.float64)
    lp, ent = token_logprobs_and_entropy(logits, tokens)
    assert lp.dtype == ent.dtype == torch.float64
    ref_lp, ref_ent = reference_token_logprobs_and_entropy(logits, tokens)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match='backend="triton" cannot run here: logits have dtype torch.float64'):
        token_logprobs(logits, tokens, backend="triton")


def test_default_backend_is_triton_where_it_can_run(monkeypatch):
    logits = torch.zeros(2, 3)
    # conftest switches the interpreter on when there is no CUDA device
    assert resolve_backend(None, logits) == ("triton" if interpreter_on() else "torch")
    if torch.cuda.is_available():
        assert resolve_backend(None, logits.cuda()) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend(None, logits) == "torch"
    with pytest.raises(ValueError, match="backend=\"triton\" cannot run here"):
        resolve_backend("triton", logits)
    with pytest.raises(ValueError, match=r"backend must be one of \('triton', 'torch'\), got 'cuda'"):
        resolve_backend("cuda", logits)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: token_logprobs(torch.zeros(2, 9), torch.zeros(3, dtype=torch.long)), "tokens has shape"),
        (lambda: token_logprobs(torch.zeros(2, 9), torch.zeros(2)), "tokens must be an integer tensor"),
        (lambda: token_logprobs(torch.zeros(2, 9, dtype=torch.long), torch.zeros(2, dtype=torch.long)), "logits"),
        (lambda: token_logprobs(torch.zeros(2, 9), torch.zeros(2, dtype=torch.long), temperature=0), "temperature"),
        (lambda: token_logprobs(torch.zeros(4, 3, 2, 9).transpose(0, 1), torch.zeros(3, 4, 2, dtype=torch.long)),
         "cannot be viewed as"),
        (lambda: token_logprobs(torch.zeros(9, 2).t(), torch.zeros(2, dtype=torch.long), backend="triton"),
         "logits must be contiguous in its last"),
    ],
)
def test_ops_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


_x, _y, _stats = torch.zeros(2, 3, 9), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3)
LAUNCHER_ERRORS = [
    (lambda: logprob_forward(_x.double(), _y), r"logits must have dtype in \(float32, bfloat16, float16\)"),
    (lambda: logprob_forward(_x[..., :0], _y), "logits has an empty vocabulary"),
    (lambda: logprob_forward(torch.zeros(9), _y), r"logits must be \[N, V\] or \[S, T, V\]"),
    (lambda: logprob_forward(_x, _y.float()), "tokens must have dtype in"),
    (lambda: logprob_forward(_x, _y[:, :2]), r"tokens must have shape \(2, 3\) like logits"),
    (lambda: logprob_forward(_x, torch.zeros(3, 2, dtype=torch.long).t()), "tokens must be contiguous"),
    (lambda: logprob_forward(_x, _y, valid=torch.ones(2, 3)), "valid must have dtype in"),
    (lambda: logprob_forward(_x, _y, rows_per_program=3), "rows_per_program must be a power of two"),
    (lambda: logprob_forward(_x, _y, block_v=0), "block_v must be a power of two"),
    (lambda: logprob_forward(_x, _y, temperature=-1.0), "temperature must be a number > 0"),
    (lambda: logprob_backward(_x, _y, _stats, _stats[:1], _stats), "row_logsum must have shape"),
    (lambda: logprob_backward(_x, _y, _stats, _stats, _stats.long()), "grad_logp must have dtype"),
    (lambda: logprob_backward(_x, _y, _stats, _stats, _stats, entropy=_stats), "entropy and grad_entropy"),
    (lambda: logprob_backward(_x, _y, _stats, _stats, _stats, out=_x.half()), "out must have dtype"),
    (lambda: logprob_backward(_x, _y, _stats, _stats, _stats, out=_x[:1]), "out must have the shape"),
]


@pytest.mark.parametrize("call, match", LAUNCHER_ERRORS, ids=[m[:30] for _, m in LAUNCHER_ERRORS])
def test_launcher_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
