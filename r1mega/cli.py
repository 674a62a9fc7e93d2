"""The `r1mega` command line.

    r1mega [CONFIG] --dry-run                 validate the resolved config and print it as JSON
    r1mega reward --data F --completions F [--out F] [CONFIG]
                                              score completions with the trainer's reward path
    r1mega synth TASK --out F [--solutions F] write a shipped synthetic task (and its solutions)
    r1mega convert --hf DIR --to-megatron OUT [--tp N --pp N --ep N --etp N --dtype D]
    r1mega convert --megatron DIR --to-hf OUT [layout]
                                              Hugging Face safetensors <-> megatron checkpoint
                                              (one process, or under torchrun for a layout)
    r1mega train [--model DIR --data F --heldout F | --resume RUN] [CONFIG]
                                              GRPO training (the embedded tiny default without a model)
    r1mega sft [--model DIR --data F | --resume RUN] [CONFIG]
                                              SFT (the embedded cold start without a model; recipe
                                              tiny-cold-start by default)
    r1mega pretrain [--out DIR --steps N]     build the embedded base model (cached)
    r1mega distill --teacher DIR --out DIR [--student DIR --data F --heldout F] [CONFIG]
                                              distillation: SFT of a small dense student on the
                                              teacher's rejection-sampled traces, evaluated
    r1mega rm --out DIR [--model DIR --data F --heldout F]
                                              train a reward model (Bradley-Terry) on preference pairs
                                              (the embedded general-prompt pairs without --data)
    r1mega plot RUN                           draw a run's curves into RUN/curves.png
    r1mega plan [--nnodes N --nproc-per-node M --plan-json F] COMMAND ...
                                              the per-rank plan of a launch of COMMAND (train, sft,
                                              convert), checked against its layout and model
    r1mega recipes                            list the named recipes
    r1mega keys                               list every config key with its documentation

CONFIG is ``--recipe NAME`` (default: tiny), ``--config FILE`` (JSON applied over the recipe, e.g.
a run's saved config.json) and any number of ``--set section.field=value``, applied in that order.
Bad input is one line on stderr and exit status 2, before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import typing
from pathlib import Path

from r1mega.config import Config, ConfigError
from r1mega.data import DataError
from r1mega.recipes import RECIPES, get_recipe, summary

DEFAULT_RECIPE = "tiny"
DEFAULT_SFT_RECIPE = "tiny-cold-start"


def _config_options(default: typing.Any) -> argparse.ArgumentParser:
    # Subcommands take the same options with SUPPRESS defaults, so values given before the
    # subcommand are not overwritten by the subparser's defaults.
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--recipe", default=default,
                        help=f"named recipe (default: {DEFAULT_RECIPE}; for sft: {DEFAULT_SFT_RECIPE})")
    parent.add_argument("--config", metavar="FILE", default=default,
                        help="JSON config applied over the recipe")
    parent.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                        default=[] if default is None else default,
                        help="override one field, e.g. --set grpo.eps_high=0.28 (repeatable)")
    return parent


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r1mega", description="GRPO training for the DeepSeek-R1 recipe.",
                                     parents=[_config_options(None)])
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the resolved config, print it as JSON and exit")
    sub = parser.add_subparsers(dest="command")
    config_options = _config_options(argparse.SUPPRESS)

    reward = sub.add_parser("reward", parents=[config_options],
                            help="score a file of completions and print a summary per reward")
    reward.add_argument("--data", required=True, metavar="FILE", help="prompt dataset (.jsonl/.json/.parquet)")
    reward.add_argument("--completions", required=True, metavar="FILE",
                        help='rows {"id": <prompt id>, "completion": <text>}')
    reward.add_argument("--out", metavar="FILE", help="write one JSON line of scores per completion")

    synth = sub.add_parser("synth", help="write a shipped synthetic task as a prompt dataset")
    synth.add_argument("task", help="arithmetic, countdown or programming")
    synth.add_argument("--out", required=True, metavar="FILE", help="prompt dataset to write (.jsonl)")
    synth.add_argument("--n", type=int, default=100, help="number of problems (default 100)")
    synth.add_argument("--difficulty", type=int, default=1, help="task difficulty (default 1)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--split", choices=("train", "test"), default="train")
    synth.add_argument("--solutions", metavar="FILE", help="also write the reference solutions as completions")
    synth.add_argument("--style", choices=("r1-zero", "r1"), default="r1-zero",
                       help="solution format (default r1-zero: <think> then <answer>)")

    convert = sub.add_parser(
        "convert", help="convert a Hugging Face safetensors directory to a megatron checkpoint or back",
        description="Hugging Face safetensors <-> megatron distributed checkpoint. Runs as one process "
        "(tp=pp=ep=1) or under torchrun with one process per rank of the layout; the megatron "
        "checkpoint loads into any layout. --hf DIR --to-hf OUT passes through megatron in memory.")
    source = convert.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", metavar="DIR", help="Hugging Face model directory (config.json + safetensors)")
    source.add_argument("--megatron", metavar="DIR", help="a checkpoint written by --to-megatron")
    target = convert.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-megatron", metavar="OUT", help="write a megatron checkpoint (needs --hf)")
    target.add_argument("--to-hf", metavar="OUT", help="write a Hugging Face safetensors directory")
    for name, doc in (("tp", "tensor-parallel"), ("pp", "pipeline-parallel"), ("ep", "expert-parallel")):
        convert.add_argument(f"--{name}", type=int, default=1, help=f"{doc} size (default 1)")
    convert.add_argument("--etp", type=int, default=None, help="expert tensor-parallel size (default: tp)")
    convert.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                         help="megatron parameter dtype (default: the config's)")

    train = sub.add_parser("train", parents=[config_options],
                           help="run GRPO (R1-Zero) training; with no model and data, the embedded tiny default")
    train.add_argument("--model", metavar="DIR", help="Hugging Face model or r1mega checkpoint (sets run.model)")
    train.add_argument("--data", metavar="FILE", help="training prompts .jsonl/.json/.parquet (sets run.data)")
    train.add_argument("--heldout", metavar="FILE", help="held-out prompts to evaluate (sets run.heldout)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress line")

    sft = sub.add_parser("sft", parents=[config_options],
                         help="supervised fine-tuning (cold start, stage 3, distillation); with no model and "
                              "data, the embedded cold start")
    sft.add_argument("--model", metavar="DIR", help="Hugging Face model or r1mega checkpoint (sets run.model)")
    sft.add_argument("--data", metavar="FILE", help="SFT rows .jsonl/.json/.parquet: prompt + completion, or "
                     "messages (sets sft.data)")
    sft.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    sft.add_argument("--quiet", action="store_true", help="no progress line")

    pretrain = sub.add_parser("pretrain", help="build the embedded base model (tokenizer + tiny MoE) into the cache")
    pretrain.add_argument("--out", metavar="DIR", help="write it here instead of the cache")
    pretrain.add_argument("--steps", type=int, help="pretraining steps (default: the embedded default's)")

    plot = sub.add_parser("plot", help="draw a run's curves into RUN/curves.png")
    plot.add_argument("run", metavar="RUN", help="a run directory")
    plot.add_argument("--out", metavar="FILE", help="PNG to write (default RUN/curves.png)")

    ev = sub.add_parser("eval", help="pass@1, cons@k, greedy accuracy, format and language rates of a model "
                                     "on problems with gold answers (the R1 protocol)")
    ev.add_argument("--model", required=True, metavar="DIR", help="a Hugging Face model directory (e.g. a run's final/)")
    ev.add_argument("--data", metavar="FILE", help="problems with gold answers (.jsonl/.json/.parquet); "
                    "default: the embedded task's held-out split")
    ev.add_argument("--embedded", choices=("addition", "r1"), default="addition",
                    help="without --data: the embedded held-out split to use: addition (R1-Zero's task, English) or "
                         "r1 (the R1 stages': English and Chinese prompts)")
    ev.add_argument("--out", metavar="DIR", help="write summary.json and problems.jsonl there")
    ev.add_argument("--samples", type=int, default=4, help="k samples per problem (default 4)")
    ev.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (default 0.6)")
    ev.add_argument("--top-p", type=float, default=0.95, help="nucleus mass (default 0.95)")
    ev.add_argument("--max-new-tokens", type=int, default=1024)
    ev.add_argument("--max-prompts", type=int, help="evaluate the first N problems only")
    ev.add_argument("--template", default="r1_zero", help="r1_zero (default), chat or raw")
    ev.add_argument("--format-style", default="answer-tags", help="answer-tags (R1-Zero, default) or summary (R1)")
    ev.add_argument("--no-greedy", action="store_true", help="skip the greedy pass")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--quiet", action="store_true", help="no progress line")
    sm = sub.add_parser("sample", help="rejection sampling: verified, readable completions of a model as SFT data")
    sm.add_argument("--model", required=True, metavar="DIR", help="a Hugging Face model directory (e.g. a run's final/)")
    sm.add_argument("--data", metavar="FILE", help="prompts with gold answers (or tests); default: the embedded "
                    "task's train split")
    sm.add_argument("--out", required=True, metavar="FILE", help="SFT JSONL to write (report: FILE.report.json)")
    sm.add_argument("--samples", type=int, default=8, help="k completions per prompt (default 8)")
    sm.add_argument("--max-per-prompt", type=int, default=4, help="most completions kept per prompt (default 4)")
    sm.add_argument("--temperature", type=float, default=0.7)
    sm.add_argument("--top-p", type=float, default=0.95)
    sm.add_argument("--max-new-tokens", type=int, default=1024)
    sm.add_argument("--max-tokens", type=int, help="longest completion kept (default: no bound but the budget)")
    sm.add_argument("--min-language", type=float, default=0.95,
                    help="language consistency needed where a prompt names a language (default 0.95)")
    sm.add_argument("--max-repeats", type=int, default=4, help="copies in a row of one span that count as runaway "
                    "repetition (default 4)")
    sm.add_argument("--judge", metavar="MODULE:FUNCTION", help="judge(record, completion) -> bool for prompts no "
                    "rule verifies (task 'general')")
    sm.add_argument("--max-prompts", type=int)
    sm.add_argument("--template", default="r1_zero", help="r1_zero (default), chat or raw")
    sm.add_argument("--format-style", default="answer-tags", help="answer-tags (R1-Zero, default) or summary (R1)")
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--quiet", action="store_true", help="no progress line")
    rm = sub.add_parser("rm", help="train a reward model (Bradley-Terry) on preference pairs")
    rm.add_argument("--model", metavar="DIR", help="a causal-LM Hugging Face directory (or r1mega checkpoint) whose "
                    "backbone gets a new score head; default: the embedded base model")
    rm.add_argument("--data", metavar="FILE", help="train pairs: prompt, chosen, rejected (.jsonl/.json/.parquet); "
                    "default: the embedded general prompts' train pairs")
    rm.add_argument("--heldout", metavar="FILE", help="held-out pairs to measure pair accuracy on; default: the "
                    "embedded test pairs without --data, none with it")
    rm.add_argument("--out", required=True, metavar="DIR", help="the reward model's directory to write (must not "
                    "exist)")
    rm.add_argument("--epochs", type=int, help="passes over the train pairs (default 4)")
    rm.add_argument("--lr", type=float, help="AdamW learning rate (default 5e-4)")
    rm.add_argument("--batch-size", type=int, help="pairs per step (default 8)")
    rm.add_argument("--max-length", type=int, help="tokens kept per prompt + completion, the last ones (default 4096, "
                    "RewardModel's)")
    rm.add_argument("--seed", type=int, help="draws the score head and the shuffles (default 0)")
    rm.add_argument("--quiet", action="store_true", help="no progress line")
    pl = sub.add_parser("pipeline", help="the whole DeepSeek-R1 recipe (cold start, reasoning RL, rejection sampling + "
                                         "SFT, reward model, all-scenario RL, distillation) on the embedded default")
    pl.add_argument("--out", default="runs/r1-pipeline", metavar="DIR",
                    help="where every stage writes (default runs/r1-pipeline); run again to resume")
    pl.add_argument("--recipe", default="r1", help="the pipeline recipe (r1)")
    pl.add_argument("--quiet", action="store_true", help="no stage lines")
    ds = sub.add_parser("distill", parents=[config_options],
                        help="distillation (R1): SFT of a small dense student on a teacher's rejection-sampled "
                             "traces; held-out figures of the student base, the student and the teacher",
                        description="CONFIG (--recipe, default tiny-cold-start; --config; --set) is the student's "
                        "SFT config. Run again with the same arguments to resume.")
    ds.add_argument("--teacher", required=True, metavar="DIR", help="the teacher's Hugging Face directory")
    ds.add_argument("--student", metavar="DIR", help="the student base (a Hugging Face directory); default: the "
                    "embedded dense student (a tiny Llama-3, built once into the cache)")
    ds.add_argument("--data", metavar="FILE", help="training prompts with gold answers; default: the embedded R1 "
                    "corpus's train split")
    ds.add_argument("--traces", metavar="FILE", help="SFT rows already rejection-sampled from the teacher (r1mega "
                    "sample's output, or stage 3's data as DeepSeek-R1 distils); skips the sampling")
    ds.add_argument("--heldout", metavar="FILE", help="held-out problems with gold answers; default: the embedded R1 "
                    "corpus's test split")
    ds.add_argument("--out", required=True, metavar="DIR", help="where traces, the student run, evaluations and "
                    "distill.json go")
    ds.add_argument("--samples", type=int, default=4, help="teacher completions per prompt (default 4)")
    ds.add_argument("--max-per-prompt", type=int, default=2, help="most traces kept per prompt (default 2)")
    ds.add_argument("--temperature", type=float, default=0.7, help="teacher sampling temperature (default 0.7; "
                    "evaluation keeps R1's 0.6)")
    ds.add_argument("--max-prompts", type=int, help="first N training prompts (embedded default: all 3670)")
    ds.add_argument("--max-heldout", type=int, help="first N held-out problems (embedded default: 100)")
    ds.add_argument("--max-new-tokens", type=int, default=96, help="teacher and evaluation budget (default 96)")
    ds.add_argument("--eval-samples", type=int, default=4, help="k samples per held-out problem (default 4)")
    ds.add_argument("--format-style", default="summary", help="summary (R1, default) or answer-tags (R1-Zero)")
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--quiet", action="store_true", help="no progress lines")
    plan = sub.add_parser("plan", help="the per-rank plan of a torchrun/Slurm launch of a command, checked "
                          "against its config and model (no GPU, no cluster; DRY_RUN=1 of the launchers)")
    plan.add_argument("--nnodes", type=int, default=1, help="nodes (default 1)")
    plan.add_argument("--nproc-per-node", type=int, default=1, help="processes per node (default 1)")
    plan.add_argument("--launch", action="append", metavar="CMD", help="the command node i runs (the i-th "
                      "--launch; the launchers pass them)")
    plan.add_argument("--plan-json", metavar="FILE", help="also write the whole plan (every rank and node) as JSON")
    plan.add_argument("--full", action="store_true", help="one row per rank even for a large world")
    plan.add_argument("command_args", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                      help="the r1mega command and its arguments, e.g. train --set parallel.tp=2")
    sub.add_parser("recipes", help="list the named recipes")
    sub.add_parser("keys", help="list every config key with its type, default and documentation")
    return parser


def resolve_config(recipe: str, config_file: str | None, overrides: list[str]) -> Config:
    """The config that a run with these arguments uses."""
    cfg = get_recipe(recipe)
    if config_file:
        cfg = cfg.with_file(config_file)
    return cfg.with_overrides(overrides)


def command_config(args: argparse.Namespace) -> Config:
    """The config the parsed command `args` runs with: the recipe (sft's own default for sft), the
    --config file (a resumed run's config.json with --resume), the --set overrides, then train's
    --model/--data/--heldout and sft's --model/--data."""
    config_file = args.config
    recipe = args.recipe or (DEFAULT_SFT_RECIPE if args.command == "sft" else DEFAULT_RECIPE)
    if args.command in ("train", "sft") and args.resume and config_file is None:
        config_file = str(Path(args.resume) / "config.json")
        if not Path(config_file).is_file():
            raise ConfigError(f"--resume {args.resume}: no config.json there (not a run directory)")
    cfg = resolve_config(recipe, config_file, args.overrides)
    if args.command == "train":
        extra = {f"run.{k}": getattr(args, k) for k in ("model", "data", "heldout") if getattr(args, k)}
        cfg = cfg.with_values(extra) if extra else cfg
    if args.command == "sft":
        extra = {k: getattr(args, name) for k, name in (("run.model", "model"), ("sft.data", "data"))
                 if getattr(args, name)}
        cfg = cfg.with_values(extra) if extra else cfg
    return cfg


def _plan(args: argparse.Namespace) -> int:
    import warnings

    warnings.filterwarnings("ignore", module=r"megatron\.")  # its import-time notes about TE/Apex
    from r1mega.parallel import ParallelConfig
    from r1mega.launch_plan import describe_run_model, make_plan, write_plan_json

    argv = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
    inner = _parser().parse_args(argv)  # bad arguments exit 2 with usage, as the command itself would
    if inner.command in ("train", "sft"):
        cfg = command_config(inner)
        parallel, model = cfg.parallel, cfg.run.model
    elif inner.command == "convert":  # its layout is its flags
        parallel, model = ParallelConfig(tp=inner.tp, pp=inner.pp, ep=inner.ep, etp=inner.etp), inner.hf
    else:
        raise ValueError(f"plan: {inner.command or 'no command'!r} is not a distributed command; "
                         "train, sft and convert run under torchrun")
    parallel.check_world(args.nnodes * args.nproc_per_node)  # before reading any model
    if inner.command == "convert" and model is None:
        desc, note = None, f"{inner.megatron}: a megatron checkpoint, not read by the plan"
    else:
        desc, note = describe_run_model(model)
    plan = make_plan(parallel, args.nnodes, args.nproc_per_node, desc=desc, model_note=note,
                     launch=tuple(args.launch or ()))
    sys.stdout.write(plan.render(full=args.full or None))
    if args.plan_json:
        write_plan_json(plan, args.plan_json)
        print(f"wrote {args.plan_json}")
    return 0


def _list_recipes() -> str:
    width = max(map(len, RECIPES))
    return "\n".join(f"{name:<{width}}  {summary(name)}" for name in sorted(RECIPES))


def _list_keys() -> str:
    lines = []
    defaults = Config()
    for section in dataclasses.fields(Config):
        obj = getattr(defaults, section.name)
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            hint = hints[f.name]
            tp = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            lines.append(f"{section.name}.{f.name}  ({tp}, default {getattr(obj, f.name)!r})\n"
                         f"    {f.metadata['doc']}")
    return "\n".join(lines)


def _reward(args: argparse.Namespace, cfg: Config) -> int:
    from r1mega.data import load_completions, load_prompts
    from r1mega.rewards import GoldAnswerError, RewardPool, parse_gold
    from r1mega.utils.io import atomic_write_text

    rc = cfg.rewards
    pairs = load_completions(args.completions, load_prompts(args.data))
    for record in {record.id: record for record, _ in pairs}.values():
        if record.task == "math":  # refuse a gold answer that could never score, before any work
            try:
                parse_gold(record.answer)
            except GoldAnswerError as err:
                raise DataError(f"{args.data}: id {record.id!r}: field 'answer': {err}") from None
    kwargs = rc.pool_kwargs()
    weights = kwargs.pop("weights")
    start = time.perf_counter()
    with RewardPool(weights, **kwargs) as pool:
        scored = pool.score([record for record, _ in pairs], [text for _, text in pairs])
        stats = pool.summary()
    seconds = time.perf_counter() - start
    if args.out:
        atomic_write_text(args.out, "".join(
            json.dumps({"id": record.id, "total": s.total, "values": s.values, "errors": s.errors})
            + "\n" for (record, _), s in zip(pairs, scored)))
    print(f"{'reward':<16}{'weight':>7}{'mean':>9}{'count':>7}{'skipped':>8}{'errors':>7}"
          f"{'timeouts':>9}{'seconds':>9}")
    for name, s in stats.items():
        print(f"{name:<16}{weights[name]:>7g}{s['mean']:>9.4f}{s['count']:>7d}{s['skipped']:>8d}"
              f"{s['errors']:>7d}{s['timeouts']:>9d}{s['seconds']:>9.2f}")
    total_mean = sum(s.total for s in scored) / len(scored)
    print(f"total mean {total_mean:.4f} over {len(scored)} completions in {seconds:.2f} s "
          f"({len(scored) / seconds:.1f} completions/s)")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from r1mega.data.synthetic import get_task, write_task
    from r1mega.utils.io import atomic_write_text

    records = write_task(args.task, args.out, args.n, seed=args.seed, difficulty=args.difficulty,
                         split=args.split)
    print(f"wrote {len(records)} {args.task} prompts to {args.out}")
    if args.solutions:
        solution = get_task(args.task).solution
        atomic_write_text(args.solutions, "".join(
            json.dumps({"id": r.id, "completion": solution(r, style=args.style)}, ensure_ascii=False) + "\n"
            for r in records))
        print(f"wrote their {args.style} solutions to {args.solutions}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    import warnings

    from r1mega.models.convert import convert_hf_to_hf, convert_hf_to_megatron, convert_megatron_to_hf
    from r1mega.models.hf_checkpoint import check_hf_checkpoint
    from r1mega.models.hf_config import describe_hf_model
    from r1mega.parallel import ParallelConfig

    if args.to_megatron and not args.hf:
        raise ValueError("convert: --to-megatron needs --hf DIR")
    parallel = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp)
    if args.hf:  # refuse a broken or unsupported directory before any process group or model exists
        check_hf_checkpoint(args.hf, describe_hf_model(args.hf))
    warnings.filterwarnings("ignore", module=r"megatron\.")  # its import-time notes about TE/Apex
    import torch.distributed as dist

    from r1mega.parallel import destroy_parallel

    try:
        if args.to_megatron:
            convert_hf_to_megatron(args.hf, args.to_megatron, parallel, dtype=args.dtype)
        elif args.megatron:
            convert_megatron_to_hf(args.megatron, args.to_hf, parallel)
        else:
            convert_hf_to_hf(args.hf, args.to_hf, parallel, dtype=args.dtype)
        if dist.get_rank() == 0:
            target = args.to_megatron or args.to_hf
            kind = "megatron checkpoint" if args.to_megatron else "Hugging Face directory"
            print(f"wrote {kind} {target} (tp={parallel.tp} pp={parallel.pp} ep={parallel.ep} "
                  f"on {dist.get_world_size()} rank(s))")
    finally:
        destroy_parallel(process_group=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "recipes":
        print(_list_recipes())
        return 0
    if args.command == "keys":
        print(_list_keys())
        return 0
    try:
        if args.command == "synth":
            return _synth(args)
        if args.command == "convert":
            return _convert(args)
        if args.command == "pretrain":
            return _pretrain(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "sample":
            return _sample(args)
        if args.command == "distill":
            return _distill(args)
        if args.command == "pipeline":
            from r1mega.pipeline import PipelineError, pipeline

            try:
                pipeline(args.out, recipe=args.recipe, progress=not args.quiet)
            except PipelineError as err:
                print(f"r1mega: error: {err}", file=sys.stderr)
                return 1
            return 0
        if args.command == "rm":
            return _rm(args)
        if args.command == "plot":
            return _plot(args)
            return 0
        if args.command == "plan":
            return _plan(args)
        cfg = command_config(args)
        if args.command == "sft" and not args.dry_run:
            from r1mega.sft.loop import sft

            sft(cfg, resume=args.resume, progress=not args.quiet)
            return 0
        if args.command == "reward":
            return _reward(args, cfg)
        if args.command == "train" and not args.dry_run:
            from r1mega.trainer.loop import StepFailed, train

            try:
                train(cfg, resume=args.resume, progress=not args.quiet)
            except StepFailed as err:
                print(f"r1mega: error: {err}", file=sys.stderr)
                return 1
            return 0
    except (ConfigError, DataError, ValueError, FileNotFoundError) as err:
        print(f"r1mega: error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        sys.stdout.write(cfg.to_json())
        return 0
    print("r1mega: error: no command; `r1mega train` runs the main job, `r1mega --help` lists the others",
          file=sys.stderr)
    return 2


def _eval(args: argparse.Namespace) -> int:
    from r1mega.evaluation import EvalSettings, evaluate_model, load_eval_problems, summary_table, write_results

    settings = EvalSettings(samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, template=args.template,
                            format_style=args.format_style, greedy=not args.no_greedy, seed=args.seed)
    if args.data:
        records = load_eval_problems(args.data, args.max_prompts)
    elif args.embedded == "r1":
        from r1mega.data import r1_corpus

        records = r1_corpus.problems("test", args.max_prompts, seed=0)
    else:
        from r1mega.data import base_corpus

        records = base_corpus.problems("test", args.max_prompts, seed=0)
    result = evaluate_model(args.model, records, settings, progress=not args.quiet)
    print(summary_table(result["summary"]))
    if args.out:
        print(f"wrote {write_results(args.out, result)}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from r1mega.evaluation import EvalSettings, load_eval_problems
    from r1mega.rejection import FilterSettings, rejection_sample, report_path, report_table
    from r1mega.rewards import load_reward

    # the same checks of the sampling settings as eval's, before any work
    EvalSettings(samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                 max_new_tokens=args.max_new_tokens, template=args.template, format_style=args.format_style)
    filters = FilterSettings(min_language=args.min_language, max_tokens=args.max_tokens,
                             max_repeats=args.max_repeats, max_per_prompt=args.max_per_prompt)
    judge = None
    if args.judge:
        try:
            judge = load_reward(args.judge)
        except ValueError as err:
            raise ValueError(f"--judge: {err}") from None
    if args.data:
        records = load_eval_problems(args.data, args.max_prompts, allow_general=judge is not None)
    else:
        from r1mega.data import base_corpus

        records = base_corpus.problems("train", args.max_prompts, seed=0)
    report = rejection_sample(args.model, records, args.out, samples=args.samples, temperature=args.temperature,
                              top_p=args.top_p, max_new_tokens=args.max_new_tokens, template=args.template,
                              format_style=args.format_style, filters=filters, judge=judge, seed=args.seed,
                              progress=not args.quiet)
    print(report_table(report))
    print(f"wrote {report['kept']} rows to {args.out} and the report to {report_path(args.out)}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    """curves.png of a GRPO or an SFT run directory (an SFT run logs no reward)."""
    from r1mega.run.logs import METRICS, plot_run, read_jsonl
    from r1mega.sft.loop import SFT_PANELS
    from r1mega.trainer.panels import GRPO_PANELS

    grpo = any("reward_mean" in m for m in read_jsonl(Path(args.run) / METRICS))
    print(plot_run(args.run, args.out, panels=GRPO_PANELS if grpo else SFT_PANELS))
    return 0


def _rm(args: argparse.Namespace) -> int:
    from r1mega.rm import embedded_pairs, load_preference_pairs, train_reward_model
    from r1mega.rm import train as rm_train
    from r1mega.run.rundir import resolve_model

    # every pair checked before any work (the model too is built only after)
    embedded = "r1mega.data.r1_corpus.preference_pairs(general_prompts({!r}))"
    embedded_train, embedded_heldout = embedded_pairs()
    train_pairs = load_preference_pairs(args.data) if args.data else embedded_train
    if args.heldout:
        heldout_pairs = load_preference_pairs(args.heldout)
    else:
        heldout_pairs = [] if args.data else embedded_heldout
    sources = {"data": args.data or embedded.format("train"),
               "heldout": args.heldout or (None if args.data else embedded.format("test"))}
    if Path(args.out).exists() and (not Path(args.out).is_dir() or any(Path(args.out).iterdir())):
        raise ValueError(f"--out {args.out}: already exists; remove it or choose another directory")
    _, hf_dir = resolve_model(args.model)
    settings = {k: getattr(args, k) if getattr(args, k) is not None else getattr(rm_train, k.upper())
                for k in ("epochs", "lr", "batch_size", "max_length", "seed")}
    result = train_reward_model(hf_dir, train_pairs, heldout_pairs, args.out, progress=not args.quiet,
                                sources=sources, **settings)
    m = result["metrics"]
    acc = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    print(f"{'held-out pairs':<24}{result['inputs']['heldout_pairs']}")
    print(f"{'held-out accuracy':<24}{acc(m['heldout_acc_before'])} -> {acc(m['heldout_acc'])}")
    print(f"{'train accuracy, loss':<24}{acc(m['train_acc'])}, {m['loss']:.4f} (last epoch)")
    print(f"{'wall time':<24}{result['seconds']['total']:.1f} s ({result['seconds']['train']:.1f} s training)")
    print(f"wrote the reward model to {result['out_dir']}")
    return 0


def _distill(args: argparse.Namespace) -> int:
    from r1mega.distill import DistillSettings, distill, result_table

    settings = DistillSettings(samples=args.samples, max_per_prompt=args.max_per_prompt, temperature=args.temperature,
                               max_new_tokens=args.max_new_tokens, eval_max_new_tokens=args.max_new_tokens,
                               eval_samples=args.eval_samples, format_style=args.format_style, seed=args.seed)
    cfg = resolve_config(args.recipe or DEFAULT_SFT_RECIPE, args.config, [])
    doc = distill(args.teacher, out_dir=args.out, student_dir=args.student, data=args.data, heldout=args.heldout,
                  max_prompts=args.max_prompts, max_heldout=args.max_heldout, settings=settings, sft_config=cfg,
                  sft_overrides=args.overrides, traces=args.traces, progress=not args.quiet)
    print(result_table(doc))
    print(f"wrote {Path(args.out) / 'distill.json'}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    import dataclasses

    from r1mega.run.base_model import PretrainSpec, ensure_base_model, pretrain_base_model

    spec = PretrainSpec() if args.steps is None else dataclasses.replace(PretrainSpec(), steps=args.steps)
    path = pretrain_base_model(args.out, spec) if args.out else ensure_base_model(spec=spec)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
