"""Worker: every rank contributes rank+1; the sum must be n(n+1)/2 on all ranks."""

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
value = torch.tensor([rank + 1.0])
dist.all_reduce(value)
assert value.item() == world * (world + 1) / 2, value
if rank == 0:
    print(f"sum={value.item():g}")
dist.destroy_process_group()
