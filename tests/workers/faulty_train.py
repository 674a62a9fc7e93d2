"""`r1mega train` with one fault injected, for tests/test_trainer_faults.py.

    python tests/workers/faulty_train.py FAULT RUN_DIR -- ARGS...

FAULT is one of:
  engine-after-save:N  the rollout engine raises at its first generate once checkpoint step N exists;
  enospc-at-save:N     the save of step N runs out of disk space halfway through a file (a partial
                       file is left in the unfinished checkpoint, as a full disk leaves it).
Everything else is the real trainer, run through the real command line.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path


def main() -> int:
    fault, run_dir, sep, *args = sys.argv[1:]
    assert sep == "--", sys.argv
    kind, n = fault.split(":")
    step_name = f"step_{int(n):08d}"
    checkpoint = Path(run_dir) / "checkpoints" / step_name
    if kind == "engine-after-save":
        from r1mega.rollout import engine as engine_module

        generate = engine_module.Engine.generate

        def failing_generate(self, *a, **k):
            if checkpoint.exists():
                raise RuntimeError("injected fault: the rollout engine failed mid-generate")
            return generate(self, *a, **k)

        engine_module.Engine.generate = failing_generate
    elif kind == "enospc-at-save":
        from r1mega.models import checkpoint as checkpoint_module

        write_rng = checkpoint_module.rng_state_files

        def full_disk(state, stem):
            if f"{step_name}.tmp-" in str(stem):
                partial = stem.with_name(stem.name + ".safetensors")
                partial.write_bytes(b"\0" * 4096)
                raise OSError(errno.ENOSPC, "No space left on device", str(partial))
            return write_rng(state, stem)

        checkpoint_module.rng_state_files = full_disk
    else:
        raise SystemExit(f"unknown fault {fault!r}")
    from r1mega.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
