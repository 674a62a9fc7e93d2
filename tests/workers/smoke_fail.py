"""Worker: rank 1 raises, so the harness must report its traceback."""

import torch.distributed as dist

dist.init_process_group("gloo")
if dist.get_rank() == 1:
    raise ValueError("rank one fails on purpose")
dist.destroy_process_group()
