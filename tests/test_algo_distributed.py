"""policy_loss under data parallelism: the ranks' summed gradients equal the full-batch gradient."""

import pytest

from tests.torchrun import run_torchrun


@pytest.mark.distributed
@pytest.mark.parametrize("nproc", [2, 3])
def test_data_parallel_gradient_sum_equals_full_batch_gradient(nproc):
    assert f"algo dp grad ok on {nproc} ranks" in run_torchrun("algo_dp_grad.py", nproc)
