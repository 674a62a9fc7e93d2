"""The compiled Triton kernels at real vocabulary sizes (32k, 152064) against float64 references.

The same checks as the kernel tests, reused from them (check_against_references,
check_case, check_linear_case: our error against the float64 reference at most twice plain
torch's at the same precision, plus the measured rounding floors), parametrised by device and
size: a small vocabulary on the CPU (the Triton interpreter, conftest sets TRITON_INTERPRET) in the
default suite, and on CUDA the 32000 (Llama/Mistral-sized) and 152064 (Qwen2.5/Qwen3) vocabularies
with a few hundred tokens, in bf16 and fp32, `gpu`-marked. launchers/gpu_check.sh runs the CUDA
ones; the vocabulary-parallel op at these sizes is test_ops_vocab_parallel's two-rank job.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_kernels_grpo_loss import check_case, make_batch
from tests.test_kernels_logprob import check_against_references, random_logits
from tests.test_ops_linear import check_linear_case, make_linear_batch

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's masked lanes

# (device, S, T, V, H): sequences, tokens per sequence, vocabulary, hidden size (fused-linear op).
# Odd token counts and a vocabulary that is no power of two on the CPU; on CUDA the models' own.
SIZES = [
    pytest.param("cpu", 2, 9, 2053, 40, id="cpu-V2053"),
    pytest.param("cuda", 4, 97, 32_000, 512, marks=pytest.mark.gpu, id="cuda-V32000"),
    pytest.param("cuda", 4, 97, 152_064, 512, marks=pytest.mark.gpu, id="cuda-V152064"),
]
DTYPES = [torch.bfloat16, torch.float32]


@pytest.mark.parametrize("device, S, T, V, H", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_logprobs_and_entropy(dtype, device, S, T, V, H, gen):
    logits, tokens = random_logits(gen, (S, T), V, dtype, device)
    check_against_references(logits, tokens, 0.9, "triton", gen)


@pytest.mark.parametrize("device, S, T, V, H", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case, agg", [("everything", "token-mean"), ("gspo-everything", "seq-mean-token-mean")])
def test_grpo_loss_forward_and_backward(case, agg, dtype, device, S, T, V, H, gen):
    batch, opts = make_batch(gen, case, S=S, T=T, V=V, dtype=dtype, device=device)
    check_case(batch, dict(opts, agg=agg), "triton")


@pytest.mark.parametrize("device, S, T, V, H", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_linear_grpo_loss(dtype, device, S, T, V, H, gen):
    """Default chunking on CUDA; on the CPU chunks of 7 tokens, so that several chunks run."""
    hidden, weight, batch, opts = make_linear_batch(gen, "everything", S=S, T=T, H=H, V=V, dtype=dtype,
                                                    device=device)
    chunks = {"chunk_tokens": 7} if device == "cpu" else {}
    check_linear_case(hidden, weight, batch, dict(opts, agg="token-mean"), backend="triton", **chunks)
