"""launchers/torchrun.sh, launchers/slurm.sbatch and their dry run (`r1mega plan`).

The dry runs resolve a DeepSeek-V3-sized config.json (no weights: the plan reads only the config)
on 2x8 and 32x8 ranks; each rank's coordinates are checked against the tp-cp-ep-dp-pp arithmetic
worked out here by hand, and, in a real gloo job, against the groups megatron builds
(tests/workers/plan_groups.py). A world or model that does not fit the layout is refused in one
line. The last test launches a real 2-rank job through torchrun.sh.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from r1mega.cli import main
from tests.models_fixtures import make_tiny_hf
from tests.torchrun import run_torchrun
from tests.trainer_helpers import REPO, run_env
from tests.workers._models_common import same_tensors

# DeepSeek-V3's published sizes (config.json of deepseek-ai/DeepSeek-V3), written here: no download.
DEEPSEEK_V3 = {
    "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
    "first_k_dense_replace": 3, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "norm_topk_prob": True, "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6, "rope_theta": 10000, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("deepseek-v3-config")
    (path / "config.json").write_text(json.dumps(DEEPSEEK_V3))
    return path


def launch(script: str, *args: str, timeout: int = 240, **env: str) -> subprocess.CompletedProcess:
    """bash launchers/<script> ARGS with `env` added (the test's Python, one thread per rank)."""
    full_env = {**run_env(), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(REPO / "launchers" / script), *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO)


def dry_run(script: str, tmp_path: Path, nnodes: int, nproc: int, *args: str) -> tuple[str, dict]:
    plan_json = tmp_path / f"plan-{nnodes}x{nproc}.json"
    proc = launch(script, *args, DRY_RUN="1", NNODES=str(nnodes), NPROC=str(nproc), PLAN_JSON=str(plan_json))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(plan_json.read_text())


def expected_coords(rank: int, tp: int, pp: int, ep: int, etp: int, world: int) -> dict[str, int]:
    """megatron's tp-cp-ep-dp-pp order by hand: tp innermost, then dp, pp outermost (dense); etp,
    ep, expert dp, pp (experts); cp = 1."""
    dp, expert_dp = world // (tp * pp), world // (etp * ep * pp)
    return {"tp": rank % tp, "dp": rank // tp % dp, "pp": rank // (tp * dp),
            "etp": rank % etp, "ep": rank // etp % ep, "expert_dp": rank // (etp * ep) % expert_dp}


def check_ranks(plan: dict, nproc: int, tp: int, pp: int, ep: int, etp: int,
                stages: list[list[int]], experts: int) -> None:
    world = plan["world"]
    assert len(plan["ranks"]) == world
    per_rank = experts // ep
    for r in plan["ranks"]:
        rank = r["rank"]
        assert (r["node"], r["local_rank"]) == (rank // nproc, rank % nproc)
        want = expected_coords(rank, tp, pp, ep, etp, world)
        assert r["coords"] == want, (rank, r["coords"], want)
        assert r["layers"] == stages[want["pp"]]
        assert r["experts"] == [want["ep"] * per_rank, (want["ep"] + 1) * per_rank]
        assert r["engine"] == (want["tp"] == 0 and want["pp"] == 0)
        # a TP group never leaves its node (tp <= nproc here): NVLink, not the network
        assert len({g // nproc for g in r["groups"]["tp"]}) == 1
    assert plan["engines"] == [r["rank"] for r in plan["ranks"] if r["engine"]]
    assert len(plan["engines"]) == plan["sizes"]["dp"] == world // (tp * pp)


def test_dry_run_2x8_prints_every_rank(tmp_path, deepseek_dir):
    sets = ["parallel.tp=8", "parallel.pp=2", "parallel.ep=8", "parallel.etp=1", "parallel.pp_first_stage_layers=30"]
    out, plan = dry_run("slurm.sbatch", tmp_path, 2, 8, "train", "--model", str(deepseek_dir),
                        *(x for s in sets for x in ("--set", s)))
    check_ranks(plan, 8, tp=8, pp=2, ep=8, etp=1, stages=[[0, 30], [30, 61]], experts=256)
    assert plan["sizes"] == {"tp": 8, "pp": 2, "dp": 1, "ep": 8, "etp": 1, "expert_dp": 1}
    assert "stages: 0: layers 0-29 (30) +embedding; 1: layers 30-60 (31) +output" in out
    table = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert len(table) == 16 and table[9][:3] == ["9", "1", "1"] and table[9][-1] == "32-63"
    # each node's command: its own node rank, the first host's rendezvous, the command as given
    for node, cmd in enumerate(plan["launch"]):
        assert f"--nnodes 2 --node-rank {node} --master-addr HEAD_NODE" in cmd, cmd
        assert cmd.endswith(f"-m r1mega.cli train --model {deepseek_dir} --set " + " --set ".join(sets)), cmd
        assert f"node {node}: {cmd}" in out


def test_dry_run_32x8_is_compact(tmp_path, deepseek_dir):
    sets = ["parallel.tp=8", "parallel.pp=4", "parallel.ep=8", "parallel.etp=1",
            "parallel.pp_first_stage_layers=13", "parallel.pp_last_stage_layers=16"]
    out, plan = dry_run("slurm.sbatch", tmp_path, 32, 8, "train", "--model", str(deepseek_dir),
                        *(x for s in sets for x in ("--set", s)))
    check_ranks(plan, 8, tp=8, pp=4, ep=8, etp=1, stages=[[0, 13], [13, 29], [29, 45], [45, 61]], experts=256)
    assert plan["sizes"]["dp"] == 8 and plan["engines"] == list(range(0, 64, 8))
    assert len(plan["launch"]) == 32 and all(f"--node-rank {i} " in c for i, c in enumerate(plan["launch"]))
    rows = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert len(rows) == 32  # one row per node, not 256
    assert rows[9] == ["9", "72-79", "0-7", "1", "1", "0-7", "0", "1", "13-28", "0-255", "-"]
    assert len(out.splitlines()) < 50


def test_dry_run_through_torchrun_sh_on_one_node(tmp_path, deepseek_dir):
    out, plan = dry_run("torchrun.sh", tmp_path, 1, 8, "train", "--model", str(deepseek_dir),
                        "--set", "parallel.tp=2", "--set", "parallel.ep=4", "--set", "parallel.etp=1",
                        "--set", "parallel.pp=2", "--set", "parallel.pp_first_stage_layers=30")
    check_ranks(plan, 8, tp=2, pp=2, ep=4, etp=1, stages=[[0, 30], [30, 61]], experts=256)
    assert plan["sizes"] == {"tp": 2, "pp": 2, "dp": 2, "ep": 4, "etp": 1, "expert_dp": 1}
    assert "--standalone" in plan["launch"][0] and "--node-rank" not in plan["launch"][0]


def test_dry_run_refuses_a_world_that_does_not_fit_in_one_line(deepseek_dir):
    proc = launch("slurm.sbatch", "train", "--model", str(deepseek_dir), "--set", "parallel.tp=8",
                  "--set", "parallel.pp=2", DRY_RUN="1", NNODES="3", NPROC="8")
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr == "r1mega: error: parallel: world size 24 is not a multiple of tp*pp = 8*2 = 16\n"
    assert proc.stdout == ""  # no plan printed


@pytest.mark.parametrize("nnodes, sets, message", [
    (2, ["parallel.tp=8", "parallel.ep=3", "parallel.etp=1"],
     "parallel: world size 16 is not a multiple of etp*ep*pp = 1*3*1 = 3"),
    (3, ["parallel.tp=8", "parallel.ep=3", "parallel.etp=1"], "parallel.ep: 3 does not divide the 256 experts"),
    (2, ["parallel.tp=8", "parallel.pp=2"], "parallel: 61 layers cannot be split over pp=2 stages"),
    (1, ["parallel.tp=16"], "parallel: world size 8 is not a multiple of tp*pp = 16*1 = 16"),
    (1, ["parallel.sequence_parallel=false", "parallel.tp=2"],
     "parallel.sequence_parallel: False must be on (or None) for an MoE model"),
])
def test_plan_refuses_a_layout_that_does_not_fit_in_one_line(capsys, deepseek_dir, nnodes, sets, message):
    argv = ["plan", "--nnodes", str(nnodes), "--nproc-per-node", "8", "--", "train", "--model", str(deepseek_dir)]
    assert main(argv + [x for s in sets for x in ("--set", s)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith(f"r1mega: error: {message}"), err


def test_dry_run_refuses_a_command_that_does_not_run_under_torchrun(tmp_path):
    proc = launch("torchrun.sh", "eval", "--model", str(tmp_path), DRY_RUN="1", NPROC="2")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("r1mega: error: plan: 'eval' is not a distributed command; "
                                   "train, sft and convert run under torchrun")


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan-models")
    return {arch: make_tiny_hf(arch, root / arch) for arch in ("qwen3_moe", "deepseek_v3")}


@pytest.mark.distributed
def test_plan_equals_megatron_groups_under_gloo(tiny_moe):
    layouts = [
        "tp2-ep2:tp=2,ep=2",  # expert TP = TP = 2
        "tp2-pp2:tp=2,pp=2",
        # layers 0-1 | 2 and experts 0-3 | 4-7 of the GPTModel each rank builds
        f"pp2-ep2:pp=2,ep=2,pp_last_stage_layers=1@{tiny_moe['qwen3_moe']}",
        f"tp2-ep2-etp1:tp=2,ep=2,etp=1@{tiny_moe['deepseek_v3']}",
    ]
    out = run_torchrun("plan_groups.py", 4, *layouts, timeout_s=300)
    assert out.split() == [x for layout in layouts for x in ("ok", layout.split(":")[0])], out


@pytest.mark.distributed
def test_torchrun_sh_runs_a_two_rank_job(tmp_path, tiny_moe):
    """`convert --tp 2` runs on both ranks (a world of one refuses tp=2 before any work: the
    layout checks above) and gives the source weights back bit for bit; each rank has its logs."""
    src, out, logs = tiny_moe["qwen3_moe"], tmp_path / "back", tmp_path / "logs"
    args = ["convert", "--hf", str(src), "--to-hf", str(out), "--tp", "2"]
    proc = launch("torchrun.sh", *args, timeout=300, NPROC="2", LOG_DIR=str(logs))
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    assert f"wrote Hugging Face directory {out} (tp=2 pp=1 ep=1 on 2 rank(s))" in proc.stdout
    assert same_tensors(src, out) == []
    rank_dirs = sorted(p.parent.name for p in logs.glob("node0/*/attempt_0/*/stdout.log"))
    assert rank_dirs == ["0", "1"], list(logs.rglob("*"))
