"""Worker for tests/test_sft.py: packed SFT in the megatron policy against transformers.

    sft_packing.py ROOT LAYOUT FAMILY...     (LAYOUT: tp1, tp2, pp2, ep2; world size to match;
                                              LAYOUT-thd: the same in the THD packed format)

For each fixture FAMILY (tests/models_fixtures.py) five examples of odd lengths, packed two or
three to a row (r1mega.sft.packing.pack_examples), go through:
  * policy.logprobs(packed, segment_ids) vs transformers on every example ALONE (its own row,
    positions from 0): max |diff|;
  * the same packed rows without segment_ids (examples see each other): must differ (the mask is
    what the first check measures);
  * policy.sft_step vs transformers: the loss sum(-log p over completion tokens) / tokens of all
    examples and its gradient norm by plain torch autograd.
Prints one line per family: ``FAMILY logp_diff D cross_diff C loss L ref_loss R gn G ref_gn H``.
"""

import sys
from pathlib import Path

from _models_common import log, quiet_megatron

LAYOUTS = {"tp1": {}, "tp2": dict(tp=2), "pp2": dict(pp=2), "ep2": dict(ep=2)}
LENGTHS = [(11, 4), (7, 3), (13, 5), (5, 2), (9, 4)]  # (tokens, prompt tokens)
ROW_TOKENS = 24


def examples(vocab: int, seed: int):
    import torch

    from r1mega.sft.packing import TokenizedExample

    g = torch.Generator().manual_seed(seed)
    out = []
    for n, prompt in LENGTHS:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        out.append(TokenizedExample(ids, [False] * prompt + [True] * (n - prompt)))
    return out


def reference(path: Path, exs) -> tuple[list, float, float]:
    """Per-example log-probs, the loss and its gradient norm, by transformers on each example alone."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    logps, total, count = [], 0.0, sum(sum(e.loss_mask[1:]) for e in exs)
    loss = 0.0
    for e in exs:
        ids = torch.tensor([e.input_ids])
        logits = model(input_ids=ids).logits
        logp = torch.log_softmax(logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
        mask = torch.tensor(e.loss_mask[1:])
        loss = loss + -(logp * mask).sum() / count
        logps.append(logp.detach())
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return logps, float(loss), float(norm)


def main() -> None:
    import torch
    import torch.distributed as dist

    from r1mega.config import OptimConfig, PolicyConfig
    from r1mega.models import load_policy
    from r1mega.sft.packing import collate, pack_examples

    quiet_megatron()
    root, layout, families = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    layout, _, packed_format = layout.partition("-")
    for i, family in enumerate(families):
        path = root / family
        policy = load_policy(path, optim=OptimConfig(lr=1e-4, weight_decay=0.0, grad_clip=None),
                             micro_batch_size=1, policy=PolicyConfig(packed_format=packed_format or "mask"),
                             **LAYOUTS[layout])
        exs = examples(policy.desc.vocab_size, seed=100 + i)
        rows = pack_examples([len(e.input_ids) for e in exs], ROW_TOKENS)
        assert sum(len(r) for r in rows) == len(exs) and len(rows) < len(exs), rows
        batch = collate(exs, rows, pad_id=0)
        ref_logps, ref_loss, ref_gn = reference(path, exs)

        logp = policy.logprobs(batch["input_ids"], batch["attention_mask"], segment_ids=batch["segment_ids"])
        crossed = policy.logprobs(batch["input_ids"], batch["attention_mask"])
        diff = cross = 0.0
        for r, members in enumerate(rows):
            start = 0
            for j in members:
                n = len(exs[j].input_ids)
                got = logp[r, start + 1:start + n].double()
                diff = max(diff, float((got - ref_logps[j].double()).abs().max()))
                cross = max(cross, float((crossed[r, start + 1:start + n].double() - ref_logps[j].double()).abs().max()))
                start += n
        metrics = policy.sft_step(batch)
        assert metrics["update_successful"] == 1.0 and metrics["tokens"] == sum(sum(e.loss_mask[1:]) for e in exs)
        if dist.get_rank() == 0:
            log(f"{family} logp_diff {diff:.3e} cross_diff {cross:.3e} loss {metrics['loss']:.8f} ref_loss "
                f"{ref_loss:.8f} gn {metrics['grad_norm']:.8f} ref_gn {ref_gn:.8f}")


if __name__ == "__main__":
    main()
