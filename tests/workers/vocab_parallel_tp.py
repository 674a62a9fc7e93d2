"""Worker: the vocabulary-parallel ops on tp ranks equal the unsharded ops (tests/test_ops_vocab_parallel.py).

    torchrun --nproc_per_node=2 tests/workers/vocab_parallel_tp.py SEED [DEVICE VOCAB]

With DEVICE and VOCAB (e.g. ``cuda 152064``; launchers/gpu_check.sh, through the gpu-marked cases
of tests/test_ops_vocab_parallel.py) only the Triton backend's log-probs, loss and fused-linear
cases run, on tensors on DEVICE, with that whole vocabulary (VOCAB / tp per rank). Gloo carries the
all-reduces of CUDA tensors, so the two ranks may share one GPU.

Every rank builds the same seeded full logits (or hidden states and output weight), keeps its
vocabulary shard (megatron's layout: rank r holds ids [r V/tp, (r + 1) V/tp); the shard width is
odd, V = tp x odd as after megatron's padding) and runs the vocab-parallel op over a tp group.
Each result is checked on every rank against the float64 reference of the unsharded logits, with
test_kernels_grpo_loss's rule (our error <= 2 x plain torch's error at the input precision + the
measured rounding floors), and against the unsharded op run in this process. Cases, all in one
launch: log-probs and entropies (both backends, fp32/bf16, tokens spread or all in one shard, a
shard that is entirely -inf for some rows); the GRPO loss with every option and GSPO, masked
tokens, NaN padding; gradient accumulation over micro-batches; linear_grpo_loss with a
vocabulary-sharded weight (and its partial hidden gradients); a group of one. Rank 0 prints one JSON line per case with the measured errors.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: tests.*

from r1mega.utils.triton_env import use_interpreter_without_cuda

use_interpreter_without_cuda()  # before anything imports a kernel module

import torch
import torch.distributed as dist

from r1mega.algo import AGG_MODES, local_denominators
from r1mega.ops import (
    grpo_loss,
    linear_grpo_loss,
    reference_grpo_loss,
    reference_token_logprobs_and_entropy,
    token_logprobs_and_entropy,
    vocab_parallel_grpo_loss,
    vocab_parallel_token_logprobs,
    vocab_parallel_token_logprobs_and_entropy,
)
from tests.loss_cases import split_options
from tests.test_kernels_grpo_loss import SPLITS, evaluate, logp_rounding_floors, make_batch
from tests.test_kernels_logprob import assert_within_torch_error, random_logits
from tests.test_ops_linear import (
    eager_linear_grpo_loss,
    evaluate_linear,
    make_linear_batch,
    rounding_floors,
)

warnings.filterwarnings("ignore", category=RuntimeWarning)  # the interpreter's masked lanes

dist.init_process_group("gloo")
RANK, WORLD = dist.get_rank(), dist.get_world_size()
GROUP = dist.new_group(list(range(WORLD)))  # the tensor-parallel group (here: every rank)
SEED = int(sys.argv[1]) if len(sys.argv) > 1 else 0
DEVICE = sys.argv[2] if len(sys.argv) > 2 else "cpu"
LARGE_VOCAB = int(sys.argv[3]) if len(sys.argv) > 3 else None
BACKENDS = ("triton", "torch")
TEMPERATURE = 0.8
report: list[dict] = []


def shard(x: torch.Tensor) -> torch.Tensor:
    """This rank's slice of the last (vocabulary) dimension."""
    width = x.shape[-1] // WORLD
    return x[..., RANK * width:(RANK + 1) * width]


def record(case: str, errors: dict) -> None:
    report.append({"case": case, **{k: [f"{e:.3g}" for e in v] for k, v in errors.items()}})


def check_logprobs(gen, backend: str, dtype: torch.dtype, layout: str, width: int = 1031, T: int = 13) -> None:
    S, V = 3, WORLD * width  # an odd shard width by default
    logits, tokens = random_logits(gen, (S, T), V, dtype, DEVICE)
    if layout == "one-shard":  # every token in rank 0's shard
        tokens = torch.randint(0, width, (S, T), generator=gen).to(DEVICE)
    elif layout == "banned-shards":  # rows whose logits outside one shard are all -inf
        logits[0, :, width:] = float("-inf")
        tokens[0] = torch.randint(0, width, (T,), generator=gen).to(DEVICE)
        logits[1, :, :width] = float("-inf")
        tokens[1] = torch.randint(width, V, (T,), generator=gen).to(DEVICE)
    grads = [torch.randn(S, T, generator=gen).to(DEVICE) for _ in range(2)]

    def run(fn, full):
        x = full.detach().clone().requires_grad_()
        logp, entropy = fn(x)
        (grad,) = torch.autograd.grad((logp * grads[0]).sum() + (entropy * grads[1]).sum(), x)
        return logp.detach(), entropy.detach(), grad

    ours = run(lambda x: vocab_parallel_token_logprobs_and_entropy(shard(x), tokens, group=GROUP,
                                                                   temperature=TEMPERATURE, backend=backend), logits)
    unsharded = run(lambda x: token_logprobs_and_entropy(x, tokens, temperature=TEMPERATURE, backend=backend), logits)
    same = run(lambda x: reference_token_logprobs_and_entropy(x, tokens, temperature=TEMPERATURE), logits)
    ref = run(lambda x: reference_token_logprobs_and_entropy(x, tokens, temperature=TEMPERATURE), logits.double())
    assert ours[2].dtype == dtype
    errors = {}
    for i, name in enumerate(["logp", "entropy", "grad"]):
        a, b, c = (shard(x[i]) if name == "grad" else x[i] for x in (ours, same, ref))
        errors[name] = assert_within_torch_error(f"{backend} {dtype} {layout} {name}", a, b, c)
        # Against the unsharded op: the same math, only the order of the vocabulary sums differs.
        u = shard(unsharded[i]) if name == "grad" else unsharded[i]
        scale = c[torch.isfinite(c)].abs().max().item()
        tolerance = 8 * torch.finfo(torch.float32).eps * max(scale, 1.0)
        if name == "grad" and dtype != torch.float32:  # one rounding of the gradient to bf16 may flip
            tolerance = max(tolerance, 2 * torch.finfo(dtype).eps * scale)
        diff = (a.double() - u.double()).abs().max().item()
        assert diff <= tolerance, f"{backend} {dtype} {layout} {name}: {diff:.3g} from the unsharded op"
        errors[name] = (*errors[name], diff)
    zero_grad = ours[2].clone()
    shard(zero_grad).zero_()
    assert (zero_grad == 0).all()  # nothing outside this rank's shard
    record(f"logprobs {backend} {str(dtype)[6:]} {layout} [ours, torch, |ours-unsharded|]", errors)


def check_loss(gen, backend: str, case: str, agg: str, dtype: torch.dtype = torch.float32, V: int = WORLD * 129,
               T: int = 13) -> None:
    batch, opts = make_batch(gen, case, T=T, V=V, dtype=dtype, device=DEVICE)  # 7 sequences, one empty
    opts = dict(opts, agg=agg)

    def sharded(logits, *args, **kwargs):
        return vocab_parallel_grpo_loss(shard(logits), *args, group=GROUP, **kwargs)

    ours = evaluate(sharded, batch, opts, backend=backend, temperature=TEMPERATURE)
    unsharded = evaluate(grpo_loss, batch, opts, backend=backend, temperature=TEMPERATURE)
    same = evaluate(reference_grpo_loss, batch, opts, temperature=TEMPERATURE)
    ref = evaluate(reference_grpo_loss, batch, opts, cast=torch.Tensor.double, temperature=TEMPERATURE)
    floors = logp_rounding_floors(batch, opts, TEMPERATURE)
    assert list(ours[1]) == list(same[1])
    name = f"loss {backend} {case} {agg} {str(dtype)[6:]}"
    errors = {"loss": assert_within_torch_error(name, ours[0], same[0], ref[0], floor=floors["loss"]),
              "grad": assert_within_torch_error(name + " grad", shard(ours[2]), shard(same[2]), shard(ref[2]))}
    for key in same[1]:
        assert ours[1][key].dtype == same[1][key].dtype and not ours[1][key].requires_grad, key
        errors[key] = assert_within_torch_error(f"{name} {key}", ours[1][key], same[1][key], ref[1][key],
                                                floor=floors[key])
    torch.testing.assert_close(ours[0], unsharded[0], rtol=1e-5, atol=1e-6)
    for key in same[1]:
        torch.testing.assert_close(ours[1][key], unsharded[1][key], rtol=1e-5, atol=1e-6, msg=key)
    record(name + " [ours, torch]", {k: errors[k] for k in ("loss", "grad", "ratio_mean", "clip_frac_low")})


def check_padding_is_never_read(gen, backend: str, level: str) -> None:
    batch, opts = make_batch(gen, "everything", V=WORLD * 129, device=DEVICE)
    opts = dict(opts, ratio_level=level, agg="seq-mean-token-sum")
    mask = batch["mask"]

    def sharded(logits, *args, **kwargs):
        return vocab_parallel_grpo_loss(shard(logits), *args, group=GROUP, backend=backend, **kwargs)

    clean = evaluate(sharded, batch, opts, temperature=TEMPERATURE)
    dirty = dict(batch, logits=batch["logits"].masked_fill(~mask[..., None], float("nan")),
                 tokens=batch["tokens"].masked_fill(~mask, -100),
                 old_logp=batch["old_logp"].masked_fill(~mask, float("nan")))
    dirty_opts = {k: v.masked_fill(~mask, float("nan")) if isinstance(v, torch.Tensor) else v for k, v in opts.items()}
    loss, metrics, grad = evaluate(sharded, dirty, dirty_opts, temperature=TEMPERATURE)
    torch.testing.assert_close(loss, clean[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, clean[2], rtol=1e-6, atol=1e-7)
    assert (grad[~mask] == 0).all()
    for key, value in metrics.items():
        torch.testing.assert_close(value, clean[1][key], rtol=1e-6, atol=1e-7, msg=key)


def check_gradient_accumulation(gen, backend: str, level: str, agg: str) -> None:
    """Micro-batches with global denominators through the vocab-parallel loss sum to the full batch."""
    batch, opts = make_batch(gen, "everything", V=WORLD * 129, device=DEVICE)
    opts = dict(opts, agg=agg, ratio_level=level)

    def sharded(logits, *args, **kwargs):
        return vocab_parallel_grpo_loss(shard(logits), *args, group=GROUP, backend=backend, **kwargs)

    full_loss, _, full_grad = evaluate(sharded, batch, opts, temperature=TEMPERATURE)
    denominators: dict[str, torch.Tensor] = {}
    for rows in SPLITS:
        for name, count in local_denominators(batch["mask"][rows], agg).items():
            denominators[name] = denominators.get(name, 0) + count
    loss_sum, grads = 0.0, []
    for rows in SPLITS:
        part = {k: v[rows] for k, v in batch.items()}
        part_opts = {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in opts.items()}
        loss, _, grad = evaluate(sharded, part, dict(part_opts, **denominators), temperature=TEMPERATURE)
        loss_sum = loss_sum + loss
        grads.append(grad)
    # The micro-batch losses are O(1) and of both signs (advantages of both signs), so their sum can
    # be far smaller than its terms: float32 rounding of O(1) terms is the absolute scale (seed
    # 133435068 summed to 0.00147 with 1.2e-7 = one float32 ulp at 1 of difference).
    torch.testing.assert_close(loss_sum, full_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat(grads), full_grad, rtol=1e-6, atol=1e-9)


def check_linear(gen, backend: str, case: str, agg: str, dtype: torch.dtype = torch.float32, V: int = WORLD * 129,
                 T: int = 11, H: int = 24) -> None:
    hidden, weight, batch, opts = make_linear_batch(gen, case, S=3, T=T, H=H, V=V, dtype=dtype, device=DEVICE)
    opts = dict(opts, agg=agg)

    def sharded(h, w, *args, **kwargs):  # this rank's rows of the weight: its vocabulary shard
        width = w.shape[0] // WORLD
        return linear_grpo_loss(h, w[RANK * width:(RANK + 1) * width], *args, group=GROUP, **kwargs)

    ours = evaluate_linear(sharded, hidden, weight, batch, opts, backend=backend, chunk_tokens=7,
                           temperature=TEMPERATURE)
    unsharded = evaluate_linear(linear_grpo_loss, hidden, weight, batch, opts, backend=backend, chunk_tokens=7,
                                temperature=TEMPERATURE)
    same = evaluate_linear(eager_linear_grpo_loss, hidden, weight, batch, opts, temperature=TEMPERATURE)
    ref = evaluate_linear(eager_linear_grpo_loss, hidden, weight, batch, opts, cast=torch.Tensor.double,
                          temperature=TEMPERATURE)
    floors = rounding_floors(hidden, weight, batch, opts, TEMPERATURE, ref)
    name = f"linear {backend} {case} {agg} {str(dtype)[6:]}"
    width = weight.shape[0] // WORLD
    rows = slice(RANK * width, (RANK + 1) * width)
    assert (ours[3][:RANK * width] == 0).all() and (ours[3][(RANK + 1) * width:] == 0).all()
    errors = {
        "loss": assert_within_torch_error(name, ours[0], same[0], ref[0], floor=floors["loss"]),
        "grad_hidden": assert_within_torch_error(name + " grad_hidden", ours[2], same[2], ref[2],
                                                 floor=floors["grad_hidden"]),
        "grad_weight": assert_within_torch_error(name + " grad_weight", ours[3][rows], same[3][rows], ref[3][rows],
                                                 floor=floors["grad_weight"]),
    }
    for key in same[1]:
        errors[key] = assert_within_torch_error(f"{name} {key}", ours[1][key], same[1][key], ref[1][key],
                                                floor=floors[key])
    torch.testing.assert_close(ours[0], unsharded[0], rtol=1e-5, atol=1e-6)
    record(name + " [ours, torch]", {k: errors[k] for k in ("loss", "grad_hidden", "grad_weight")})


def check_partial_hidden_gradients(gen) -> None:
    """hidden_grad_all_reduce=False leaves each rank's partial; their sum is the all-reduced gradient."""
    hidden, weight, batch, opts = make_linear_batch(gen, "defaults", S=2, T=5, H=8, V=WORLD * 33, device=DEVICE)
    width = weight.shape[0] // WORLD
    spec, tensors = split_options(opts)
    grads = {}
    for all_reduce in (True, False):
        h = hidden.clone().requires_grad_()
        loss, _ = linear_grpo_loss(h, weight[RANK * width:(RANK + 1) * width], batch["tokens"], batch["old_logp"],
                                   batch["advantages"], batch["mask"], spec, group=GROUP,
                                   hidden_grad_all_reduce=all_reduce, chunk_tokens=3, temperature=TEMPERATURE,
                                   **tensors)
        loss.backward()
        grads[all_reduce] = h.grad
    partial = grads[False].clone()
    dist.all_reduce(partial, group=GROUP)
    torch.testing.assert_close(partial, grads[True], rtol=1e-6, atol=1e-8)
    assert grads[True].abs().sum() > 0 and not torch.equal(grads[False], grads[True])


def check_group_of_one_equals_plain_op(gen) -> None:
    """A group of size 1 runs the plain op (no collective), bit for bit."""
    solo = dist.new_group([RANK], use_local_synchronization=True)
    logits, tokens = random_logits(gen, (2, 5), 67, torch.float32, DEVICE)
    torch.testing.assert_close(vocab_parallel_token_logprobs(logits, tokens, group=solo),
                               token_logprobs_and_entropy(logits, tokens)[0], rtol=0, atol=0)


def check_large_vocabulary(gen, vocab: int) -> None:
    """The Triton backend at a real vocabulary (each rank holds vocab / WORLD columns)."""
    assert vocab % WORLD == 0, f"vocabulary {vocab} is not a multiple of tp = {WORLD}"
    for dtype in (torch.float32, torch.bfloat16):
        check_logprobs(gen, "triton", dtype, "spread", width=vocab // WORLD, T=64)
        check_loss(gen, "triton", "everything", "token-mean", dtype=dtype, V=vocab, T=48)
        check_linear(gen, "triton", "everything", "token-mean", dtype=dtype, V=vocab, T=48, H=256)
    check_loss(gen, "triton", "gspo-everything", "seq-mean-token-mean", V=vocab, T=48)


gen = torch.Generator().manual_seed(SEED)
for backend in BACKENDS if LARGE_VOCAB is None else ():
    for dtype in (torch.float32, torch.bfloat16):
        check_logprobs(gen, backend, dtype, "spread")
    check_logprobs(gen, backend, torch.float32, "one-shard")
    check_logprobs(gen, backend, torch.float32, "banned-shards")
    check_loss(gen, backend, "everything", "token-mean")
    check_loss(gen, backend, "gspo-everything", "seq-mean-token-mean")
    check_loss(gen, backend, "dual-clip", "seq-mean-token-sum-norm")
    for level in ("token", "sequence"):
        check_padding_is_never_read(gen, backend, level)
        check_linear(gen, backend, "everything" if level == "token" else "gspo-everything",
                     "token-mean" if level == "token" else "seq-mean-token-mean")
if LARGE_VOCAB is not None:
    check_large_vocabulary(gen, LARGE_VOCAB)
else:
    check_loss(gen, "triton", "everything", "seq-mean-token-mean", dtype=torch.bfloat16)
    check_linear(gen, "triton", "everything", "token-mean", dtype=torch.bfloat16)
    for level in ("token", "sequence"):
        for agg in AGG_MODES:
            check_gradient_accumulation(gen, "triton", level, agg)
    check_gradient_accumulation(gen, "torch", "sequence", "token-mean")
    check_partial_hidden_gradients(gen)
    check_group_of_one_equals_plain_op(gen)

if RANK == 0:
    for row in report:
        print(json.dumps(row))
    print(f"vocab parallel ok on {WORLD} ranks ({DEVICE}), {len(report)} measured cases")
dist.destroy_process_group()
