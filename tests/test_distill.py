"""Distillation: the dense student's spec, config and tokenizer (the teacher's vocabulary, the
default base's cache key unchanged), and `r1mega distill` end to end on a small teacher (traces
with provenance, a Llama student final/ that transformers loads, distill.json with the three rows),
resumed at phase granularity, with bad input refused in one line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from r1mega.run.base_model import STUDENT_SPEC, PretrainSpec
from tests.run_wide import built_once
from tests.trainer_helpers import r1mega

# the test student: STUDENT_SPEC's model and corpus, pretrained for a few steps
SMALL_STUDENT = dataclasses.replace(STUDENT_SPEC, steps=30, batch_size=8, threads=1)


@pytest.fixture(scope="session")
def small_student(tmp_path_factory):
    from r1mega.run.base_model import ensure_base_model

    return built_once(tmp_path_factory, "student-cache",
                      lambda cache: ensure_base_model(cache, SMALL_STUDENT, progress=False))


def _exit_follows_the_claim(proc, out) -> None:
    """`r1mega distill` exits 0 when the distilled student beats its own base on held-out pass@1,
    else 3 with one line giving both figures (after writing distill.json)."""
    results = {r["role"]: r for r in json.loads((out / "distill.json").read_text())["results"]}
    beats = results["student"]["pass_at_1"] > results["student_base"]["pass_at_1"]
    assert proc.returncode == (0 if beats else 3), proc.stderr[-4000:]
    if not beats:
        lines = proc.stderr.strip().splitlines()
        assert lines[-1].startswith("r1mega: error: the distilled student does not beat its own base"), proc.stderr


def test_student_spec_has_its_own_key_and_the_default_key_is_pinned():
    # VERSION 3 (PretrainSpec.threads): the entries built before it may hold a base pretrained with
    # any thread count, so none of them is reused
    assert PretrainSpec().key() == "47d043416621"
    assert PretrainSpec(arch="qwen3_moe", threads=2).key() == PretrainSpec().key()
    assert PretrainSpec().cache_name() == "tiny-base-47d043416621"
    keys = {STUDENT_SPEC.key(), SMALL_STUDENT.key(), dataclasses.replace(STUDENT_SPEC, hidden_size=128).key(),
            dataclasses.replace(STUDENT_SPEC, arch="qwen2").key(), PretrainSpec().key(),
            PretrainSpec(threads=1).key()}
    assert len(keys) == 6
    assert STUDENT_SPEC.cache_name() == f"tiny-llama-{STUDENT_SPEC.key()}"
    assert STUDENT_SPEC.arch == "llama" and STUDENT_SPEC.key() != PretrainSpec().key()
    # the tokenizer is a function of the corpus fields: the student's are the default's
    for name in ("train_problems", "noise", "seed", "vocab_size"):
        assert getattr(STUDENT_SPEC, name) == getattr(PretrainSpec(), name), name
    with pytest.raises(ValueError, match="arch"):
        PretrainSpec(arch="gpt2")
    with pytest.raises(ValueError, match="dense"):
        PretrainSpec(hidden_size=64)


def test_student_config_is_a_dense_llama_of_another_size():
    import torch
    import transformers

    from r1mega.models import describe_hf_config
    from r1mega.models.tiny import tiny_dense_config, tiny_moe_config

    teacher, student = tiny_moe_config(396), tiny_dense_config(396)
    assert student["model_type"] == "llama" and student["architectures"] == ["LlamaForCausalLM"]
    assert not any("expert" in k for k in student)
    size = lambda cfg: (cfg["num_hidden_layers"], cfg["hidden_size"])  # noqa: E731
    assert size(student) != size(teacher)
    desc, teacher_desc = describe_hf_config(student), describe_hf_config(teacher)  # what the megatron policy reads
    assert desc.arch == "llama" and not desc.is_moe and desc.tie_embeddings and not desc.qkv_bias
    assert desc.num_kv_heads < desc.num_heads and teacher_desc.is_moe
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**student))
    assert type(model).__name__ == "LlamaForCausalLM"
    moe = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**teacher))
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in moe.parameters()) / 3
    qwen2 = tiny_dense_config(396, arch="qwen2")
    assert type(transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**qwen2))).__name__ == "Qwen2ForCausalLM"
    with pytest.raises(ValueError, match="arch"):
        tiny_dense_config(396, arch="qwen3_moe")


def test_student_tokenizer_equals_the_teachers(small_student, small_base_model):
    import transformers

    from r1mega.distill import same_vocabulary

    assert small_student.name == SMALL_STUDENT.cache_name() and (small_student / "pretrain.json").is_file()
    assert json.loads((small_student / "config.json").read_text())["model_type"] == "llama"
    student = transformers.AutoTokenizer.from_pretrained(str(small_student))
    teacher = transformers.AutoTokenizer.from_pretrained(str(small_base_model))
    assert student.get_vocab() == teacher.get_vocab() and len(student) == len(teacher)
    assert (student.pad_token_id, student.bos_token_id, student.eos_token_id) == (0, 1, 2)
    text = "What is 68 + 57? <think> add 8+7=15 6+5+1=12 so </think> 答案是 $\\boxed{125}$。"
    assert student(text)["input_ids"] == teacher(text)["input_ids"]
    assert same_vocabulary(small_student, small_base_model)


def _greedy_answers(model_dir: Path, prompts: list[str], max_new_tokens: int) -> list:
    """The model's greedy final answers (None where it gives none), so that the test's gold answers
    are what the barely pretrained teacher says and its traces pass the accuracy rule."""
    import torch
    import transformers

    from r1mega.rewards import extract_final_answer
    from r1mega.templates import r1_zero_prompt

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    answers = []
    for prompt in prompts:
        ids = tok(r1_zero_prompt(prompt), return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
        answers.append(extract_final_answer(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))[0])
    return answers


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def test_r1mega_distill_end_to_end_and_resumed(tmp_path, small_base_model, small_student):
    """The teacher (the 40-step MoE base, R1-Zero format) on 4 prompts whose gold answers are its
    own greedy ones, near-greedy sampling: traces with provenance; one SFT epoch of the student;
    three evaluated rows. A second call reuses every phase; other settings are refused."""
    import transformers

    prompts = ["What is 12 + 30?", "What is 21 + 43?", "What is 50 + 17?", "What is 33 + 33?"]
    answers = _greedy_answers(small_base_model, prompts, 48)
    train = [{"id": f"t{i}", "prompt": p, "task": "math", "answer": a}
             for i, (p, a) in enumerate(zip(prompts, answers)) if a is not None]
    assert len(train) >= 2, answers
    data = _write(tmp_path / "train.jsonl", train)
    heldout = _write(tmp_path / "heldout.jsonl",
                     [{"id": "h1", "prompt": "What is 14 + 25?", "task": "math", "answer": "39"},
                      {"id": "h2", "prompt": "What is 60 + 31?", "task": "math", "answer": "91"}])
    out = tmp_path / "distill"
    argv = ["distill", "--teacher", str(small_base_model), "--student", str(small_student), "--data", str(data),
            "--heldout", str(heldout), "--out", str(out), "--samples", "2", "--max-per-prompt", "1",
            "--max-new-tokens", "48", "--eval-samples", "2", "--format-style", "answer-tags", "--temperature", "0.01",
            "--quiet"]
    for s in ("sft.epochs=1", "sft.rows_per_step=2", "sft.row_tokens=256", "batch.micro_batch_tokens=512"):
        argv += ["--set", s]
    proc = r1mega(*argv)
    assert proc.returncode in (0, 3), proc.stderr[-4000:]
    _exit_follows_the_claim(proc, out)

    rows = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]
    assert rows, (out / "traces.jsonl.report.json").read_text()
    for row in rows:
        assert {"id", "prompt", "completion", "task", "provenance"} <= set(row)
        assert row["provenance"]["source"] == str(small_base_model)
        assert row["provenance"]["prompt_id"] in {t["id"] for t in train}
        assert row["provenance"]["rewards"]["accuracy"] == 1.0 and row["provenance"]["rewards"]["format"] == 1.0

    final = out / "student" / "final"
    model = transformers.AutoModelForCausalLM.from_pretrained(final)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 3
    assert transformers.AutoTokenizer.from_pretrained(str(final)).get_vocab() == \
        transformers.AutoTokenizer.from_pretrained(str(small_base_model)).get_vocab()

    doc = json.loads((out / "distill.json").read_text())
    assert doc["complete"] and [r["role"] for r in doc["results"]] == ["student_base", "student", "teacher"]
    for r in doc["results"]:
        for key in ("pass_at_1", "cons_at_k", "format_rate", "language_rate", "response_length_mean"):
            assert key in r, (r, key)
        assert 0.0 <= r["pass_at_1"] <= 1.0 and 0.0 <= r["format_rate"] <= 1.0
    assert doc["inputs"]["student"]["arch"] == "llama" and doc["inputs"]["teacher"]["arch"] == "qwen3_moe"
    assert doc["inputs"]["student"]["parameters"] < doc["inputs"]["teacher"]["parameters"]
    assert doc["inputs"]["same_vocabulary"] is True
    assert doc["traces"]["kept"] == len(rows) and doc["sft"]["examples"] == len(rows)
    assert doc["student_final"] == str(final.resolve()) and doc["student_base"] == str(small_student.resolve())
    assert {"traces", "sft", "eval_student_base", "eval_student", "eval_teacher", "total"} <= set(doc["seconds"])
    assert doc["reused"] == []
    assert "student (distilled)" in proc.stdout and "teacher" in proc.stdout

    # resumed: every phase is complete, nothing is redone
    traces_bytes, weights = (out / "traces.jsonl").read_bytes(), (final / "model.safetensors").read_bytes()
    proc = r1mega(*argv)
    _exit_follows_the_claim(proc, out)
    again = json.loads((out / "distill.json").read_text())
    assert again["reused"] == ["traces", "sft", "eval_student_base", "eval_student", "eval_teacher"]
    assert again["results"] == doc["results"]
    for phase in ("traces", "sft", "eval_teacher"):  # the seconds of the work that made each output
        assert again["seconds"][phase] == doc["seconds"][phase], phase
    assert (out / "traces.jsonl").read_bytes() == traces_bytes and (final / "model.safetensors").read_bytes() == weights

    # other settings in the same directory, and a key distill sets itself: one line, exit 2
    for extra, word in ((["--samples", "3"], "other settings"), (["--set", "run.model=x"], "run.model")):
        proc = r1mega(*argv, *extra)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and word in lines[0], proc.stderr

    # given traces (DeepSeek-R1's students learn from stage 3's curated data): no sampling phase
    given = _write(tmp_path / "given.jsonl", rows)
    out2 = tmp_path / "given-out"
    argv2 = [a for a in argv if a not in (str(data), "--data")]
    argv2[argv2.index(str(out))] = str(out2)
    proc = r1mega(*argv2, "--traces", str(given))
    _exit_follows_the_claim(proc, out2)
    doc2 = json.loads((out2 / "distill.json").read_text())
    assert doc2["traces"] == {"path": str(given.resolve()), "kept": len(rows), "given": True}
    assert doc2["sft"]["examples"] == len(rows) and not (out2 / "traces.jsonl").exists()
    assert doc2["inputs"]["data"]["rows"] == len(rows) and "traces given" in proc.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "What is 1 + 1?", "completion": ""}\n')
    for extra, word in ((["--traces", str(given), "--data", str(data)], "--data"), (["--traces", str(bad)], "bad.jsonl")):
        proc = r1mega(*argv2, *extra)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and word in lines[0], proc.stderr
