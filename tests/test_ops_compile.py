"""torch.compile(fullgraph=True) traces through the r1mega.ops custom ops and matches eager.

One test on purpose: a cold inductor compile costs ~20 s on a 2-core CPU. It covers every op
(logprob forward/backward, in place too, the fused GRPO forward, GSPO's elementwise terms) on
both backends, with the Triton kernels running under the CPU interpreter.

It checks that a compilation really happened (a backend that counts the graphs it hands to
inductor): an earlier in-process megatron build on CPU (r1mega/megatron_compat/cpu_shim.py) sets
TORCH_COMPILE_DISABLE=1 and torch._dynamo.config.disable, after which torch.compile returns the
eager function and the comparison would be eager against eager. In such a process the test runs
itself in a fresh subprocess with compilation enabled instead.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r1mega.algo import LossSpec
from r1mega.ops import grpo_loss, token_logprobs_and_entropy

pytestmark = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # the interpreter's masked lanes, see test_kernels_logprob
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),  # inductor's
]


def step(h, W, tokens, old_logp, advantages, mask, ref_logp):
    # lm_head logits as in a trainer; the GSPO loss reuses its logits buffer for the gradient.
    logits, logits_gspo = h @ W, h @ W
    kl = LossSpec(kl_coef=0.1, kl_estimator="k3", kl_clamp=10.0)
    loss, metrics = grpo_loss(logits, tokens, old_logp, advantages, mask, kl.replace(dual_clip=3.0), temperature=0.9,
                              ref_logp=ref_logp)
    gspo, _ = grpo_loss(logits_gspo, tokens, old_logp, advantages, mask,
                        LossSpec(ratio_level="sequence", agg="seq-mean-token-mean"), temperature=0.9,
                        inplace_backward=True)
    torch_loss, _ = grpo_loss(h @ W, tokens, old_logp, advantages, mask, kl, backend="torch", temperature=0.9,
                              ref_logp=ref_logp)
    logp, entropy = token_logprobs_and_entropy(logits, tokens, temperature=0.9)
    total = loss + gspo + torch_loss - 0.01 * (entropy * mask).sum() / mask.sum()
    return total, metrics["clip_frac_high"], metrics["kl_mean"], logp


CHILD_ENV = "R1MEGA_OPS_COMPILE_CHILD"  # set in the subprocess, which must not start another


def compile_disabled() -> bool:
    """Whether torch.compile is a no-op in this process (the environment or dynamo's config)."""
    import torch._dynamo.config as dynamo_config

    return os.environ.get("TORCH_COMPILE_DISABLE", "0") not in ("", "0") or bool(dynamo_config.disable)


def test_compiled_ops_match_eager():
    if compile_disabled():
        assert not os.environ.get(CHILD_ENV), "torch.compile is disabled even in the fresh subprocess"
        # TORCH_COMPILE_DISABLE=0, not unset: the megatron CPU shim only sets it where it is unset.
        env = {**os.environ, "TORCH_COMPILE_DISABLE": "0", CHILD_ENV: "1"}
        node = f"{Path(__file__).resolve()}::test_compiled_ops_match_eager"
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node],
                             capture_output=True, text=True, timeout=600, env=env,
                             cwd=Path(__file__).resolve().parents[1])
        assert out.returncode == 0 and "1 passed" in out.stdout, f"{out.stdout[-4000:]}\n{out.stderr[-2000:]}"
        return
    check_compiled_ops_match_eager()


def check_compiled_ops_match_eager():
    # CPU tensors run the kernels under the interpreter; with CUDA, the compiled kernels on the GPU.
    from torch._dynamo import lookup_backend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    S, T, D, V = 3, 11, 16, 203
    h = torch.randn(S, T, D, generator=gen).to(device)
    W = (torch.randn(D, V, generator=gen) / 2).to(device)
    tokens = torch.randint(0, V, (S, T), generator=gen).to(device)
    mask = (torch.arange(T)[None, :] < torch.tensor([T, 0, 5])[:, None]).to(device)
    with torch.no_grad():
        logp = torch.log_softmax((h @ W) / 0.9, -1).gather(-1, tokens[..., None])[..., 0]
    inputs = (tokens, logp + 0.3 * torch.randn(S, T, generator=gen).to(device),
              torch.randn(S, generator=gen).to(device), mask, logp + 0.2 * torch.randn(S, T, generator=gen).to(device))

    graphs = []
    inductor = lookup_backend("inductor")

    def counting_inductor(gm, example_inputs):
        graphs.append(gm)
        return inductor(gm, example_inputs)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend=counting_inductor)):
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
        out = fn(hh, WW, *inputs)
        out[0].backward()
        results.append([x.detach() for x in out] + [hh.grad, WW.grad])
    # fullgraph: the whole step is one graph, and it went through inductor (not eager vs eager)
    assert len(graphs) == 1, f"{len(graphs)} graphs compiled (torch.compile disabled?)"
    ops = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert any("r1mega" in op for op in ops), sorted(ops)  # the custom ops are in the graph, not traced through
    for name, eager, compiled in zip(["loss", "clip_frac_high", "kl_mean", "logp", "h.grad", "W.grad"], *results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6, msg=name)
