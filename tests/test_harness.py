"""The test harness itself: torchrun on gloo, and Triton under its CPU interpreter."""

import pytest
import torch

from tests.torchrun import WorkerFailure, run_torchrun


@pytest.mark.distributed
def test_torchrun_runs_ranks_and_returns_rank0_stdout():
    assert "sum=3" in run_torchrun("smoke_allreduce.py", 2)


@pytest.mark.distributed
def test_torchrun_failure_reports_the_failing_ranks_traceback():
    with pytest.raises(WorkerFailure, match="rank one fails on purpose"):
        run_torchrun("smoke_fail.py", 2)


def test_triton_kernel_launches_here():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def _scale_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        keep = offs < n
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=keep) * 3.0, mask=keep)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(1000, device=device)
    out = torch.empty_like(x)
    _scale_kernel[(triton.cdiv(1000, 128),)](x, out, 1000, BLOCK=128)
    torch.testing.assert_close(out, x * 3.0)
