"""The SFT trainer: packed rows in the megatron policy against transformers on each example alone
(log-probs, loss, gradient norm; TP/PP layouts too), the packer, the data checks, and
`r1mega sft` end to end with a bitwise resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.torchrun import run_torchrun
from tests.trainer_helpers import r1mega


def _parse(stdout: str) -> dict[str, dict[str, float]]:
    out = {}
    for line in stdout.splitlines():
        m = re.match(r"(\w+) logp_diff (\S+) cross_diff (\S+) loss (\S+) ref_loss (\S+) gn (\S+) ref_gn (\S+)", line)
        if m:
            out[m.group(1)] = dict(zip(("logp", "cross", "loss", "ref_loss", "gn", "ref_gn"), map(float, m.groups()[1:])))
    return out


def _check(results: dict, families) -> None:
    assert sorted(results) == sorted(families), results
    for family, r in results.items():
        assert r["logp"] < 2e-5, (family, r)  # each packed example = the example alone in transformers
        assert r["cross"] > 0.05, (family, r)  # without segment ids the examples see each other
        assert abs(r["loss"] - r["ref_loss"]) <= 1e-6 * abs(r["ref_loss"]) + 1e-6, (family, r)
        assert abs(r["gn"] - r["ref_gn"]) <= 1e-5 * r["ref_gn"], (family, r)


def test_packed_sft_step_matches_transformers_on_each_example_alone(tiny_models):
    families = ("qwen3_moe", "deepseek_v3_yarn", "qwen2", "llama")
    _check(_parse(run_torchrun("sft_packing.py", 1, str(tiny_models), "tp1", *families)), families)


@pytest.mark.parametrize("layout,families", [("tp2", ("deepseek_v3_yarn", "qwen3_moe")), ("pp2", ("qwen2", "llama"))])
def test_packed_sft_in_tp2_and_pp2_matches_transformers(tiny_models, layout, families):
    _check(_parse(run_torchrun("sft_packing.py", 2, str(tiny_models), layout, *families)), families)


@pytest.mark.parametrize("world,layout,families", [
    (1, "tp1-thd", ("qwen3_moe", "deepseek_v3_yarn", "qwen2", "llama")),
    (2, "tp2-thd", ("deepseek_v3_yarn", "qwen3_moe")),  # sequence parallel: N padded to a multiple of 2
    (2, "pp2-thd", ("qwen2",)),  # the stages exchange [B * T, 1, H]
])
def test_packed_sft_in_thd_format_matches_transformers(tiny_models, world, layout, families):
    """policy.packed_format=thd: megatron's PackedSeqParams with cu_seqlens (TE's fused attention
    on a GPU; the CPU shim's local attention takes them as a block-diagonal mask)."""
    _check(_parse(run_torchrun("sft_packing.py", world, str(tiny_models), layout, *families)), families)


def test_thd_batch_against_brute_force():
    from r1mega.megatron_compat import thd_causal_mask
    from r1mega.models.packing import ThdBatch

    ids = torch.arange(1, 25).reshape(3, 8)
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0, 0, 0]])
    thd = ThdBatch(ids, seg, total=20)
    # the sequences, read off row by row and segment by segment, then the padding tail
    sequences = [[ids[b, t].item() for t in range(8) if seg[b, t] == s]
                 for b in range(3) for s in sorted(set(seg[b].tolist()) - {0})]
    flat = [tok for sq in sequences for tok in sq]
    assert thd.input_ids[0, :len(flat)].tolist() == flat and thd.input_ids.shape == (1, 20)
    bounds = [0]
    for sq in sequences:
        bounds.append(bounds[-1] + len(sq))
    assert thd.cu_seqlens.tolist() == bounds + [20] and thd.cu_seqlens.dtype == torch.int32
    assert thd.max_seqlen == max(max(map(len, sequences)), 20 - len(flat))
    assert thd.position_ids[0].tolist() == [i for sq in sequences for i in range(len(sq))] + list(range(20 - len(flat)))
    assert thd.padding_mask[0].tolist() == [False] * len(flat) + [True] * (20 - len(flat))
    out = thd.unpack(thd.input_ids.unsqueeze(-1).float().requires_grad_())
    assert torch.equal(out[..., 0], torch.where(seg > 0, ids, 0).float())
    mask = thd_causal_mask(thd.cu_seqlens, 20)[0, 0]
    seq_of = [i for i, sq in enumerate(sequences) for _ in sq] + [len(sequences)] * (20 - len(flat))
    for t in range(20):
        for u in range(20):
            assert bool(mask[t, u]) == (not (u <= t and seq_of[u] == seq_of[t])), (t, u)
    with pytest.raises(ValueError, match="do not fit"):
        ThdBatch(ids, seg, total=len(flat) - 1)


def test_segment_positions_and_block_mask_against_brute_force():
    from r1mega.models.packing import block_causal_mask, check_segments, segment_positions

    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]])
    pos = segment_positions(seg)
    mask = block_causal_mask(seg)
    for b in range(2):
        for t in range(8):
            first = min(u for u in range(8) if seg[b, u] == seg[b, t])
            if seg[b, t]:
                assert pos[b, t] == t - first
            for u in range(8):
                allowed = (u <= t and seg[b, u] == seg[b, t]) or u == t
                assert bool(mask[b, 0, t, u]) == (not allowed), (b, t, u)
    check_segments(seg, seg > 0)
    with pytest.raises(ValueError, match="1, 2, ... in order"):
        check_segments(torch.tensor([[1, 3, 0]]), torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="exactly where attention_mask is 1"):
        check_segments(torch.tensor([[1, 0, 0]]), torch.tensor([[1, 1, 0]]))


def test_plan_visits_every_example_once_per_epoch_within_the_row_budget():
    from r1mega.sft.loop import plan_steps
    from r1mega.sft.packing import TokenizedExample, collate

    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(2, 40, (53,), generator=g).tolist()
    exs = [TokenizedExample(list(range(n)), [False] + [True] * (n - 1)) for n in lengths]
    for pack in (True, False):
        plan = plan_steps(exs, epochs=3, rows_per_step=3, row_tokens=64, pack=pack, seed=5)
        assert plan == plan_steps(exs, epochs=3, rows_per_step=3, row_tokens=64, pack=pack, seed=5)
        for epoch in range(3):
            seen = sorted(i for e, rows in plan if e == epoch for row in rows for i in row)
            assert seen == list(range(53)), (pack, epoch)
        for _, rows in plan:
            assert 1 <= len(rows) <= 3
            assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
            if not pack:
                assert all(len(row) == 1 for row in rows)
        batch = collate(exs, plan[0][1], pad_id=0)
        assert not batch["loss_mask"][:, 0].any() and (batch["loss_mask"] <= batch["attention_mask"]).all()
    packed = plan_steps(exs, epochs=1, rows_per_step=3, row_tokens=64, pack=True, seed=5)
    single = plan_steps(exs, epochs=1, rows_per_step=3, row_tokens=64, pack=False, seed=5)
    assert len(packed) < len(single) / 2  # packing uses the rows


BAD_ROWS = [
    ({"prompt": "What is 2 + 2?", "completion": ""}, "line 2: field 'completion': empty"),
    ({"prompt": "What is 2 + 2?"}, "line 2: field 'completion': missing"),
    ({"prompt": 3, "completion": "4"}, "line 2: field 'prompt': expected a string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "line 2: field 'messages': no assistant turn"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "line 2: field 'messages[0].role': 'bot' is not one of"),
    ({"messages": [{"role": "assistant", "content": " "}]}, "line 2: field 'messages[0].content': empty assistant"),
    ({"id": "a", "prompt": "q", "completion": "c"}, "line 2: field 'id': duplicate 'a' (first at line 1)"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS, ids=[m.split(": ", 1)[1][:30] for _, m in BAD_ROWS])
def test_a_bad_sft_row_stops_with_one_line_naming_file_row_and_field(tmp_path, row, message):
    from r1mega.data import DataError
    from r1mega.sft.data import load_sft_data

    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "q", "completion": "c"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as err:
        load_sft_data(path)
    assert str(err.value) == f"{path}: {message}" or str(err.value).startswith(f"{path}: {message}"), str(err.value)
    proc = r1mega("sft", "--data", str(path), "--set", f"run.out_dir={tmp_path}/runs")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()


def test_chat_rows_train_on_assistant_turns_only(small_base_model, tmp_path):
    import transformers

    from r1mega.sft.data import SFTExample, tokenize_example
    from r1mega.run.base_model import with_chat_template

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(with_chat_template(small_base_model, tmp_path / "chat")))
    turns = (("system", "be brief"), ("user", "What is 2 + 2?"), ("assistant", "<think> 2+2=4 </think> 4"),
             ("user", "and 3 + 3?"), ("assistant", "6"))
    ex = tokenize_example(SFTExample("c", messages=turns), tokenizer, "chat")
    trained = tokenizer.decode([i for i, m in zip(ex.input_ids, ex.loss_mask) if m])
    assert trained == "<think> 2+2=4 </think> 4<|eos|>6<|eos|>", trained
    plain = tokenize_example(SFTExample("p", prompt="What is 2 + 2?", completion=" <think> x </think> 4"), tokenizer,
                             "r1_zero")
    assert tokenizer.decode([i for i, m in zip(plain.input_ids, plain.loss_mask) if m]) == " <think> x </think> 4<|eos|>"


def test_sft_runs_learns_and_resumes_bit_for_bit(tmp_path, small_base_model):
    """`r1mega sft` on 40 cold-start rows: the loss falls; 1 epoch then --resume with 2 epochs
    equals 2 epochs straight, bit for bit (metrics and final weights)."""
    from r1mega.data.r1_corpus import cold_start_rows
    from r1mega.sft.data import write_sft_rows

    data = write_sft_rows(tmp_path / "cold.jsonl", cold_start_rows(40))
    common = ["--model", str(small_base_model), "--data", str(data), "--quiet"]
    sets = [f"run.out_dir={tmp_path}", "sft.rows_per_step=2", "sft.row_tokens=256", "run.save_every=3",
            "optim.lr=1e-3"]

    def run(*args):
        cli = list(args)
        for s in sets:
            cli += ["--set", s]
        proc = r1mega(*cli)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    run("sft", *common, "--set", "run.name=whole", "--set", "sft.epochs=2")
    run("sft", *common, "--set", "run.name=part", "--set", "sft.epochs=1")
    run("sft", "--resume", str(tmp_path / "part"), "--quiet", "--set", "sft.epochs=2")
    whole, part = tmp_path / "whole", tmp_path / "part"
    rows = lambda run_dir: [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "tokens_per_s")}  # noqa: E731
                            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows(part) == rows(whole) and len(rows(whole)) >= 6
    assert rows(whole)[-1]["loss"] < 0.5 * rows(whole)[0]["loss"]
    assert (part / "final/model.safetensors").read_bytes() == (whole / "final/model.safetensors").read_bytes()
    for name in ("config.json", "summary.json", "curves.png", "final/config.json", "final/tokenizer.json"):
        assert (whole / name).is_file(), name
    import transformers

    transformers.AutoModelForCausalLM.from_pretrained(whole / "final")  # an ordinary HF directory


def test_embedded_r1_corpus_splits_languages_mixing_and_preferences():
    from r1mega.data import r1_corpus
    from r1mega.rewards import get_reward
    from r1mega.rewards.language import language_consistency

    train, test = r1_corpus.problems("train"), r1_corpus.problems("test")
    assert not {r.id for r in train} & {r.id for r in test}
    assert {r.language for r in test} == {"en", "zh"}
    for r in test[:20]:
        for mixed in (False, True):
            text = r1_corpus.completion(r, mixed=mixed)
            assert get_reward("accuracy")(r, text).value == 1.0 and get_reward("format_summary")(r, text).value == 1.0
            reasoning = text.split("</think>")[0]
            assert (language_consistency(reasoning, r.language) < 1.0) == mixed, (r.id, text)
    rows = r1_corpus.cold_start_rows(200)
    assert 0.35 < sum(r["mixed"] for r in rows) / len(rows) < 0.65
    general_train, general_test = r1_corpus.general_prompts("train"), r1_corpus.general_prompts("test")
    assert not {r.id for r in general_train} & {r.id for r in general_test}
    for r in general_test:
        assert r1_corpus.judge(r, r1_corpus.general_completion(r))
    pairs = r1_corpus.preference_pairs(general_test)
    by_prompt = {r.prompt: r for r in general_test}
    for p in pairs:
        record = next(r for r in general_test if r.prompt == p["prompt"] and f"pair-{r.id}-" in p["id"])
        assert r1_corpus.judge(record, p["chosen"]) and not r1_corpus.judge(record, p["rejected"]), p
    assert by_prompt and {p["family"] for p in pairs} == {"repeat", "greet"}


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_the_learning_rate_schedule_is_transformers_warmup_then_decay(tmp_path, small_base_model, decay):
    """optim.lr_decay over the run's optimizer steps (warm-up included), step by step as
    transformers' get_{cosine,linear}_schedule_with_warmup gives it (min_lr 0)."""
    import torch
    import transformers

    from r1mega.data.r1_corpus import cold_start_rows
    from r1mega.sft.data import write_sft_rows

    data = write_sft_rows(tmp_path / "cold.jsonl", cold_start_rows(21))
    proc = r1mega("sft", "--model", str(small_base_model), "--data", str(data), "--quiet",
                  *[a for s in (f"run.out_dir={tmp_path}", "run.name=decay", "sft.rows_per_step=2", "sft.row_tokens=256",
                                "sft.epochs=1", "sft.pack=false", "optim.lr=2e-3", "optim.warmup_steps=3",
                                f"optim.lr_decay={decay}") for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "decay" / "metrics.jsonl").read_text().splitlines()]
    assert len(lrs) == 11
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    make = getattr(transformers, f"get_{decay}_schedule_with_warmup")
    schedule = make(opt, num_warmup_steps=3, num_training_steps=len(lrs))
    reference = []
    for _ in lrs:
        reference.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs == pytest.approx(reference, rel=1e-9, abs=1e-12)
    assert lrs[3] == pytest.approx(2e-3) and lrs[-1] < lrs[5] < lrs[4] < lrs[3]  # it does decay
