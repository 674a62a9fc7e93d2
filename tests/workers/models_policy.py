"""Worker for the Policy tests (tests/test_models_policy.py, tests/test_models_checkpoint.py).

Modes (argv[1]):

reference ROOT OUT            1 rank. For DeepSeek-V3, Qwen3-MoE and Qwen2: the HF import and export
                              round trip bit for bit, log-probs vs transformers' model on the same
                              device, a 3-step GRPO trajectory (checkpoint after step 1 in
                              OUT/ckpt-FAMILY), the bucket stream vs the HF export; the TP1 results go
                              to OUT/ref-FAMILY.pt. R1MEGA_TEST_DEVICE=cuda: all of it on the GPU
                              (the gpu-marked variant of tests/test_models_policy.py).
layouts ROOT OUT NAME...      every layout NAME (tests/workers/_policy_common.LAYOUTS) in turn, re-
                              initialising the groups: log-probs vs transformers and vs TP1, the
                              trajectory vs TP1, resume from the TP1 checkpoint (and from the previous
                              layout's of the same family) vs TP1, the bucket stream vs the HF export.
kill OUT FAMILY MARKER        1 process (no torchrun): resume OUT/ckpt-FAMILY, train a step, start
                              saving step 2; after the weights are written, touch MARKER and wait to
                              be killed.

Prints one line per check for the test to read.
"""

import sys
import time
from pathlib import Path

from _models_common import (
    LOGIT_ATOL,
    log,
    quiet_megatron,
    reference,
    same_tensors,
    transformers_logits,
    worker_device,
)
from _policy_common import (
    DATA_STATE,
    LAYOUTS,
    MICRO_BATCH,
    OPTIM,
    RESUME_AT,
    SEQ,
    STEPS,
    collect_buckets,
    compare_with_export,
    digest,
    full_batch,
    loss_spec,
    make_batch,
    rel,
    rel_params,
)

FAMILIES = ("deepseek_v3", "qwen3_moe", "qwen2")


def parity(policy, root: Path, family: str, device: str | None = None) -> float:
    """max |our log-probs - transformers'| on the fixture's ids: transformers' logits computed by
    its model on ``device`` now, or (None) those the fixture saved on the CPU."""
    import torch

    ref = reference(root, family)
    ids = ref["ids"]
    logits = ref["logits"] if device is None else transformers_logits(root / family, ids, device)
    expected = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    got = policy.logprobs(ids)
    assert got.shape == ids.shape and got.dtype == torch.float32 and bool((got[:, 0] == 0).all())
    return float((got[:, 1:].double() - expected).abs().max())


def transformers_step(root: Path, family: str, batch) -> tuple[float, float]:
    """The GRPO loss and its gradient norm by plain torch autograd: transformers' own model,
    log_softmax, and r1mega.algo.policy_loss with the whole batch's denominators."""
    import torch
    import transformers

    from r1mega.algo import local_denominators, policy_loss

    device = worker_device()
    model = transformers.AutoModelForCausalLM.from_pretrained(root / family, dtype=torch.float32).to(device)
    model.train()
    on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    ids, am, cm = on_device["input_ids"], on_device["attention_mask"], on_device["completion_mask"]
    logits = model(input_ids=ids, attention_mask=am.long()).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    spec = loss_spec(family)
    mask = cm[:, 1:]
    loss, _ = policy_loss(logp, on_device["old_logp"][:, 1:], on_device["advantages"], mask, spec,
                          ref_logp=on_device["ref_logp"][:, 1:],
                          rollout_logp=on_device["rollout_logp"][:, 1:] if "rollout_logp" in batch else None,
                          **local_denominators(mask, spec.agg))
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return float(loss), float(norm)


def trajectory(policy, batch, spec, steps, *, save_to=None):
    losses, norms = [], []
    for _ in range(steps):
        metrics = policy.train_step(batch, spec)
        assert metrics["update_successful"] == 1.0, metrics
        losses.append(metrics["loss"])
        norms.append(metrics["grad_norm"])
        if save_to is not None and policy.step == RESUME_AT:
            policy.save_checkpoint(save_to, data_state=DATA_STATE)
    return losses, norms


def params_of(buckets):
    return {name: value[3] for name, value in buckets.items()}


def load(path, **kwargs):
    from r1mega.config import OptimConfig
    from r1mega.models import load_policy

    return load_policy(path, optim=OptimConfig(**OPTIM), micro_batch_size=MICRO_BATCH, **kwargs)


def check_save_refusals(policy, out: Path) -> None:
    """A bad data_state or an existing step is refused before anything is written; keep_last prunes."""
    from r1mega.models import list_checkpoints
    from r1mega.models.errors import CheckpointError

    root = out / "ckpt-refusals"
    for data_state, what in (({"x": float("nan")}, "nan"), ({"x": object()}, "object"), ([1, 2], "list")):
        try:
            policy.save_checkpoint(root, data_state=data_state)
        except CheckpointError as err:
            assert "JSON-safe" in str(err), err
            log(f"refused data_state {what}: {err}")
        else:
            raise AssertionError(f"data_state {what} was accepted")
    assert not root.exists() or not any(root.iterdir())
    policy.save_checkpoint(root, data_state={"a": 1})
    try:
        policy.save_checkpoint(root)
    except CheckpointError as err:
        assert "already exists" in str(err), err
        log(f"refused existing step: {err}")
    else:
        raise AssertionError("saving an existing step was accepted")
    policy.step += 1  # pretend another step was taken: keep_last=1 must remove the older one
    policy.save_checkpoint(root, keep_last=1)
    policy.step -= 1
    kept = [step for step, _ in list_checkpoints(root)]
    assert kept == [policy.step + 1], kept
    log(f"keep_last ok {kept}")


def check_refusals(policy, tensors, spec) -> None:
    """Bad batches are refused with a ValueError naming the problem, before any collective."""
    bad_mask = tensors["attention_mask"].clone()
    bad_mask[0, 2] = False  # a hole: not right-padded
    early = tensors["completion_mask"].clone()
    early[:, 0] = True
    assert spec.kl_coef != 0 and spec.tis_cap is not None, spec  # the KL and TIS refusals below need both
    cases = {
        "left padding": (dict(tensors, attention_mask=bad_mask), spec, "right-padded"),
        "t=0 in the loss": (dict(tensors, completion_mask=early), spec, "must be 0 at t = 0"),
        "unknown key": (dict(tensors, global_tokens=10), spec, "unknown batch key 'global_tokens'"),
        "missing key": ({k: v for k, v in tensors.items() if k != "old_logp"}, spec, "no 'old_logp'"),
        "norm_length": (tensors, spec.replace(agg="seq-mean-token-sum-norm"), "needs norm_length"),
        "shape": (dict(tensors, old_logp=tensors["old_logp"][:, 1:]), spec, "old_logp has shape"),
    }
    # The batch and the LossSpec must fit: no loss option among the tensors, the tensors the spec needs.
    spec_cases = {
        "loss option in the batch": (dict(tensors, eps_low=0.1), spec, "unknown batch key 'eps_low'"),
        "kl without ref_logp": ({k: v for k, v in tensors.items() if k != "ref_logp"}, spec, "needs ref_logp"),
        "tis without rollout_logp": ({k: v for k, v in tensors.items() if k != "rollout_logp"}, spec,
                                     "tis_cap needs rollout_logp"),
    }
    for what, (bad, bad_spec, message) in {**cases, **spec_cases}.items():
        try:
            policy.train_step(bad, bad_spec)
        except ValueError as err:
            assert message in str(err), (what, err)
        else:
            raise AssertionError(f"{what} was accepted")
    log(f"refused bad batches: {', '.join(cases)}")
    log(f"refused batches that do not fit the LossSpec: {', '.join(spec_cases)}")


def check_bf16(root: Path) -> None:
    """bf16 parameters (fp32 Adam main weights): log-probs near fp32's, a finite step, source dtypes out."""
    import torch

    from r1mega.algo import LossSpec
    from r1mega.models import load_policy

    ids = reference(root, "deepseek_v3")["ids"]
    fp32 = load_policy(root / "deepseek_v3_bf16").logprobs(ids)
    policy = load_policy(root / "deepseek_v3_bf16", dtype=torch.bfloat16)
    logp = policy.logprobs(ids)
    diff = float((logp - fp32).abs().max())
    assert diff < 0.05, diff
    cm = torch.ones_like(ids, dtype=torch.bool)
    cm[:, 0] = False
    metrics = policy.train_step(dict(input_ids=ids, attention_mask=torch.ones_like(cm), completion_mask=cm,
                                     old_logp=logp, advantages=torch.tensor([1.0, -1.0])), LossSpec())
    assert metrics["update_successful"] == 1.0 and torch.isfinite(torch.tensor(metrics["grad_norm"])), metrics
    dtypes = {str(t.dtype) for bucket in policy.hf_weight_buckets(1 << 20) for _, t in bucket}
    assert dtypes == {"torch.bfloat16", "torch.float32"}, dtypes  # bf16 weights, fp32 expert bias
    log(f"bf16 ok max_abs_diff_vs_fp32 {diff:.3g}")


def check_round_trip(policy, root: Path, family: str, out: Path) -> None:
    """Exporting the freshly loaded policy gives the source's tensors bit for bit."""
    export = out / f"round-trip-{family}"
    policy.export_hf(export)
    problems = same_tensors(root / family, export)
    assert not problems, f"{family}: HF -> policy -> HF changed tensors: {problems[:5]}"
    log(f"round trip {family} ok")


def run_reference(root: Path, out: Path) -> None:
    import torch

    device = worker_device()
    log(f"device {device}")
    for family in FAMILIES:
        policy = load(root / family)
        assert policy.device.type == device, f"the policy is on {policy.device}, the test asked for {device}"
        check_round_trip(policy, root, family, out)
        diff = parity(policy, root, family, device)
        assert diff <= LOGIT_ATOL, f"{family}: log-probs differ from transformers by {diff:.3g}"
        log(f"parity {family} tp1 max_abs_diff {diff:.3g}")
        ids, am, cm, adv, g = make_batch(policy.desc.vocab_size)
        logp0 = policy.logprobs(ids, am)
        assert bool((logp0[~am] == 0).all())
        batch = full_batch(family, ids, am, cm, adv, logp0, g)
        hf_loss, hf_norm = transformers_step(root, family, batch)
        check_token_budget(root, family, batch, logp0, hf_loss, hf_norm)
        losses, norms = trajectory(policy, batch, loss_spec(family), STEPS, save_to=out / f"ckpt-{family}")
        loss_diff, norm_rel = abs(losses[0] - hf_loss), abs(norms[0] - hf_norm) / hf_norm
        assert loss_diff <= 1e-5 and norm_rel <= 1e-4, (family, losses[0], hf_loss, norms[0], hf_norm)
        log(f"train_step vs transformers autograd {family} loss {losses[0]:.8f} vs {hf_loss:.8f} "
            f"grad_norm {norms[0]:.8f} vs {hf_norm:.8f}")
        if family == "deepseek_v3":
            check_save_refusals(policy, out)
            check_refusals(policy, batch, loss_spec(family))
        final_logp = policy.logprobs(ids, am)
        buckets, count, _ = collect_buckets(policy)
        export = out / f"export-{family}-tp1"
        policy.export_hf(export)
        problems = compare_with_export(buckets, export)
        assert not problems, problems[:5]
        assert count > 1, count
        log(f"buckets {family} tp1 ok count={count} tensors={len(buckets)}")
        log(f"trajectory {family} tp1 losses {' '.join(f'{x:.6f}' for x in losses)} "
            f"grad_norms {' '.join(f'{x:.6f}' for x in norms)}")
        torch.save({"batch": batch, "logp0": logp0, "losses": losses, "grad_norms": norms, "final_logp": final_logp,
                    "final_params": params_of(buckets)}, out / f"ref-{family}.pt")
        del policy
    check_bf16(root)
    check_converted(root, out)


def check_token_budget(root: Path, family: str, batch, logp0, hf_loss: float, hf_norm: float) -> None:
    """Token-budget micro-batches (several rows each, rows of unequal length packed together)
    give the log-probs of the row micro-batches and the first step of transformers' autograd."""
    budget = 2 * SEQ + 1  # two rows at most: the 6 rows take 3+ micro-batches of mixed lengths
    policy = load(root / family)
    for balance in ("karmarkar-karp", "none"):
        diff = rel(policy.logprobs(batch["input_ids"], batch["attention_mask"], micro_batch_tokens=budget,
                                   balance=balance), logp0)
        assert diff <= 1e-6, (family, balance, diff)
    metrics = policy.train_step(batch, loss_spec(family), micro_batch_tokens=budget)
    assert abs(metrics["loss"] - hf_loss) <= 1e-5 and abs(metrics["grad_norm"] - hf_norm) <= 1e-4 * hf_norm, (
        family, metrics["loss"], hf_loss, metrics["grad_norm"], hf_norm)
    log(f"token budget {budget} {family} logp {diff:.3g} loss {metrics['loss']:.8f} vs {hf_loss:.8f} "
        f"grad_norm {metrics['grad_norm']:.8f} vs {hf_norm:.8f}")
    # the full-logits head (what bench_policy compares the fused head with) is the same step
    del policy
    metrics = load(root / family).train_step(batch, loss_spec(family), micro_batch_tokens=budget, loss_head="logits")
    assert abs(metrics["loss"] - hf_loss) <= 1e-5 and abs(metrics["grad_norm"] - hf_norm) <= 1e-4 * hf_norm, (
        family, metrics["loss"], hf_loss, metrics["grad_norm"], hf_norm)
    log(f"logits head {family} loss {metrics['loss']:.8f} vs {hf_loss:.8f} "
        f"grad_norm {metrics['grad_norm']:.8f} vs {hf_norm:.8f}")
    check_policy_variants(root, family, batch, logp0, hf_loss, hf_norm, budget)


def check_policy_variants(root: Path, family: str, batch, logp0, hf_loss: float, hf_norm: float, budget: int) -> None:
    """The same log-probs and first step in the THD packed format (every row's real tokens back
    to back with cu_seqlens) and, for MoE families, with grouped-GEMM experts."""
    from r1mega.config import PolicyConfig

    variants = {"thd": PolicyConfig(packed_format="thd")}
    if family != "qwen2":
        variants["grouped"] = PolicyConfig(grouped_gemm=True)
        variants["grouped+thd"] = PolicyConfig(grouped_gemm=True, packed_format="thd")
    for name, policy_config in variants.items():
        policy = load(root / family, policy=policy_config)
        diff = rel(policy.logprobs(batch["input_ids"], batch["attention_mask"], micro_batch_tokens=budget), logp0)
        metrics = policy.train_step(batch, loss_spec(family), micro_batch_tokens=budget)
        assert diff <= 1e-6, (family, name, diff)
        assert abs(metrics["loss"] - hf_loss) <= 1e-5 and abs(metrics["grad_norm"] - hf_norm) <= 1e-4 * hf_norm, (
            family, name, metrics["loss"], hf_loss, metrics["grad_norm"], hf_norm)
        log(f"variant {name} {family} logp {diff:.3g} loss {metrics['loss']:.8f} vs {hf_loss:.8f} "
            f"grad_norm {metrics['grad_norm']:.8f} vs {hf_norm:.8f}")
        del policy


def check_converted(root: Path, out: Path) -> None:
    """A directory written by `r1mega convert --to-megatron` loads as a Policy (weights only)."""
    from r1mega.models import convert_hf_to_megatron
    from r1mega.parallel import ParallelConfig

    convert_hf_to_megatron(root / "qwen2", out / "converted-qwen2", ParallelConfig())
    policy = load(out / "converted-qwen2", trainable=False)
    diff = parity(policy, root, "qwen2", worker_device())
    assert diff <= LOGIT_ATOL and policy.optimizer is None, diff
    log(f"converted qwen2 ok max_abs_diff {diff:.3g}")


def run_layouts(root: Path, out: Path, names: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from r1mega.parallel import ParallelConfig, destroy_parallel

    previous_ckpt: dict[str, Path] = {}
    for name in names:
        family, kwargs = LAYOUTS[name]
        parallel = ParallelConfig(**kwargs)
        ref = torch.load(out / f"ref-{family}.pt", weights_only=False)
        batch, ids, am = ref["batch"], ref["batch"]["input_ids"], ref["batch"]["attention_mask"]
        started = time.perf_counter()

        policy = load(root / family, parallel=parallel)
        diff = parity(policy, root, family)
        assert diff <= LOGIT_ATOL, f"{name}: log-probs differ from transformers by {diff:.3g}"
        logp0 = rel(policy.logprobs(ids, am), ref["logp0"])
        if policy.layout.dp > 1:  # each data-parallel replica passes only its own rows
            mine = slice(policy.layout.dp_rank, None, policy.layout.dp)
            own = policy.logprobs(ids[mine], am[mine], split_dp=False)
            assert rel(own, ref["logp0"][mine]) <= 1e-6, rel(own, ref["logp0"][mine])
            for balance in ("karmarkar-karp", "none"):  # rows spread by token count or in blocks
                packed = policy.logprobs(ids, am, micro_batch_tokens=2 * SEQ + 1, balance=balance)
                assert rel(packed, ref["logp0"]) <= 1e-6, (name, balance, rel(packed, ref["logp0"]))
        save_to = out / f"ckpt-{name}"
        losses, norms = trajectory(policy, batch, loss_spec(family), STEPS, save_to=save_to)
        final_logp = rel(policy.logprobs(ids, am), ref["final_logp"])
        buckets, count, largest = collect_buckets(policy)
        params = rel_params(params_of(buckets), ref["final_params"])
        export = out / f"export-{name}"
        policy.export_hf(export)
        digests = [None] * dist.get_world_size()
        dist.all_gather_object(digests, digest(buckets))
        assert len(set(digests)) == 1, f"{name}: ranks received different buckets"
        if dist.get_rank() == 0:
            problems = compare_with_export(buckets, export)
            assert not problems, f"{name}: bucket stream != HF export: {problems[:5]}"
        del policy, buckets

        sources = [("tp1", out / f"ckpt-{family}")] + ([previous_ckpt[family]] if family in previous_ckpt else [])
        resume = []
        for source_name, source in sources:
            resumed = load(source, parallel=parallel)
            assert resumed.step == RESUME_AT and resumed.data_state == DATA_STATE, (resumed.step, resumed.data_state)
            assert resumed.load_report.optimizer, resumed.load_report
            r_losses, _ = trajectory(resumed, batch, loss_spec(family), STEPS - RESUME_AT)
            r_logp = rel(resumed.logprobs(ids, am), ref["final_logp"])
            r_params = rel_params(params_of(collect_buckets(resumed)[0]), ref["final_params"])
            resume.append((source_name, rel(r_losses, ref["losses"][RESUME_AT:]), r_logp, r_params,
                           resumed.load_report.rng.split(" ")[0]))
            del resumed
        previous_ckpt[family] = (name, save_to)

        if dist.get_rank() == 0:
            log(f"layout {name} parity {diff:.3g} logp0 {logp0:.3g} losses {rel(losses, ref['losses']):.3g} "
                f"grad_norms {rel(norms, ref['grad_norms']):.3g} final_logp {final_logp:.3g} params {params:.3g} "
                f"buckets {count} largest {largest} seconds {time.perf_counter() - started:.1f}")
            for source_name, r_loss, r_logp, r_params, rng in resume:
                log(f"resume {name} from {source_name} losses {r_loss:.3g} final_logp {r_logp:.3g} "
                    f"params {r_params:.3g} rng {rng}")
            log(f"export {name} ok")
    destroy_parallel(process_group=True)


def run_kill(out: Path, family: str, marker: Path) -> None:
    import torch
    from megatron.core import dist_checkpointing

    ref = torch.load(out / f"ref-{family}.pt", weights_only=False)
    policy = load(out / f"ckpt-{family}")
    assert policy.step == RESUME_AT
    log(f"resumed step {policy.step} rng {policy.load_report.rng}")  # same layout: restored
    policy.train_step(ref["batch"], loss_spec(family))
    original = dist_checkpointing.save

    def save_then_hang(*args, **kwargs):  # the weights are on disk; the checkpoint is not published yet
        result = original(*args, **kwargs)
        marker.write_text("written\n")
        time.sleep(600)
        return result

    dist_checkpointing.save = save_then_hang
    policy.save_checkpoint(out / f"ckpt-{family}", data_state={"never": "published"})
    raise AssertionError("the save was not killed")


def main() -> None:
    quiet_megatron()
    mode = sys.argv[1]
    if mode == "reference":
        run_reference(Path(sys.argv[2]), Path(sys.argv[3]))
    elif mode == "layouts":
        run_layouts(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
    elif mode == "kill":
        run_kill(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
