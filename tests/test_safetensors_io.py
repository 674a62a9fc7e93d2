"""safetensors_io against the safetensors library's own serialisation, from a device that is not the
CPU: the TorchScript lazy backend ships with every torch build, and like CUDA its tensors cannot be
read by numpy directly (the export and weight-stream path once called .numpy() on CUDA tensors)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save

from r1mega.models.safetensors_io import tensor_bytes


@pytest.fixture(scope="module")
def lazy_device():
    try:
        import torch._lazy.ts_backend

        torch._lazy.ts_backend.init()  # once per process: a second init raises
    except Exception as err:  # noqa: BLE001 - a torch build without it
        pytest.skip(f"no lazy tensor backend in this torch build ({err})")
    return torch.device("lazy")


def _library_bytes(name: str, tensor: torch.Tensor) -> bytes:
    data = save({name: tensor})
    (size,) = struct.unpack("<Q", data[:8])
    start, end = json.loads(data[8:8 + size])[name]["data_offsets"]
    return data[8 + size + start: 8 + size + end]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_tensor_bytes_from_another_device_equal_the_librarys(dtype, lazy_device):
    device = lazy_device
    host = (torch.arange(3 * 5 * 7, dtype=torch.float64).reshape(3, 5, 7) / 7 - 4).to(dtype)
    on_device = host.to(device).transpose(0, 2)  # not contiguous either
    with pytest.raises(TypeError, match="numpy"):
        on_device.numpy()  # what a CUDA tensor does too
    assert tensor_bytes(on_device) == _library_bytes("t", host.transpose(0, 2).contiguous())
    assert tensor_bytes(host) == _library_bytes("t", host)
