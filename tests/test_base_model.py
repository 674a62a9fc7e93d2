"""The embedded base model's pretraining: the same bits whatever thread count the process has."""

from __future__ import annotations

import json

import torch

from r1mega.run.base_model import PretrainSpec, pretrain_base_model
from tests.golden_metrics import weights_hash

TINY = PretrainSpec(steps=3, batch_size=3, train_problems=40, vocab_size=300, threads=2)


def test_pretraining_runs_its_own_thread_count_whatever_the_process_has(tmp_path):
    before = torch.get_num_threads()
    hashes = []
    try:
        for i, process_threads in enumerate((1, 2)):
            torch.set_num_threads(process_threads)
            out = pretrain_base_model(tmp_path / f"base{i}", TINY, progress=False)
            assert torch.get_num_threads() == process_threads  # restored
            assert json.loads((out / "pretrain.json").read_text())["threads"] == TINY.threads
            hashes.append(weights_hash(out))
    finally:
        torch.set_num_threads(before)
    assert hashes[0] == hashes[1]


def test_processes_asking_for_one_cache_entry_build_it_once(tmp_path):
    """Two processes call ensure_base_model on an empty cache at once: one builds, the other waits
    and gets the same directory (it used to build too and fail to move its copy into place)."""
    import subprocess
    import sys

    code = ("import sys; from r1mega.run.base_model import PretrainSpec, ensure_base_model; "
            "print(ensure_base_model(sys.argv[1], PretrainSpec(steps=3, batch_size=3, train_problems=40, "
            "vocab_size=300, threads=1), progress=True, chat=True))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert outs[0][0] == outs[1][0] and outs[0][0].strip().endswith("-chat")
    assert sum("building the embedded base model" in err for _, err in outs) == 1
    entries = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert len(entries) == 2 and entries[1] == entries[0] + "-chat"
