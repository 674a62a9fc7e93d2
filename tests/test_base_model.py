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
