"""The `r1mega` command line: it parses and dispatches; each command's body lives in its module.

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
    r1mega eval --model DIR [--data F --out DIR] [CONFIG]
                                              the R1 evaluation protocol (the eval section)
    r1mega sample --model DIR --out F [--data F] [CONFIG]
                                              rejection sampling into SFT data (the sample section)
    r1mega distill --teacher DIR --out DIR [--student DIR --data F --heldout F] [CONFIG]
                                              distillation: SFT of a small dense student on the
                                              teacher's rejection-sampled traces, evaluated
    r1mega rm --out DIR [--model DIR --data F --heldout F] [CONFIG]
                                              train a reward model (Bradley-Terry) on preference pairs
                                              (the embedded general-prompt pairs without --data)
    r1mega pipeline [--out DIR] [CONFIG]      every R1 stage on the embedded default (recipe r1)
    r1mega plot RUN                           draw a run's curves into RUN/curves.png
    r1mega plan [--nnodes N --nproc-per-node M --plan-json F] COMMAND ...
                                              the per-rank plan of a launch of COMMAND (train, sft,
                                              convert), checked against its layout and model
    r1mega recipes                            list the named recipes
    r1mega keys                               list every config key, the key aliases and the flags

CONFIG, which every command takes, is ``--recipe NAME`` (default: tiny; sft and distill:
tiny-cold-start; pipeline: r1), ``--config FILE`` (JSON applied over the recipe, e.g. a run's
saved config.json), any number of ``--set section.field=value``, then the command's own flags
that are aliases of keys (:data:`FLAG_KEYS`: ``sample --samples 4`` is ``--set sample.samples=4``),
applied in that order: a flag given on the command line wins over --set. ``--dry-run`` prints the
config a command would run with and exits. Bad input is one line on stderr and exit status 2,
before any work starts. What is not a setting (input and output paths, --quiet) stays a plain
argument and is passed to the command's function next to the Config.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import typing
from pathlib import Path

from r1mega.config import KEY_ALIASES, Config, ConfigError, parse_value
from r1mega.data import DataError
from r1mega.recipes import BENCHMARKS, RECIPES, get_recipe, summary

DEFAULT_RECIPE = "tiny"
DEFAULT_SFT_RECIPE = "tiny-cold-start"
# the recipe a command resolves its config from when --recipe is not given
DEFAULT_RECIPES = {"sft": DEFAULT_SFT_RECIPE, "distill": DEFAULT_SFT_RECIPE, "pipeline": "r1"}


class Flag(typing.NamedTuple):
    """A command-line flag that is an alias of a config key."""

    flag: str
    key: str
    help: str = ""
    metavar: typing.Optional[str] = None
    const: typing.Any = None  # not None: a switch (no value) that sets the key to this

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


# Every command's flags that are aliases of config keys: the one table from which the parsers are
# built and the config is resolved (command_config).
FLAG_KEYS: dict[str, tuple[Flag, ...]] = {
    "train": (
        Flag("--model", "run.model", "Hugging Face model or r1mega checkpoint", "DIR"),
        Flag("--data", "run.data", "training prompts: a file (.jsonl/.json/.parquet, .gz), a directory of shards or a "
             "datasets save_to_disk directory", "FILE"),
        Flag("--heldout", "run.heldout", "held-out prompts to evaluate", "FILE"),
        Flag("--format", "data.format", "the files' published format: r1mega (default), gsm8k, math, aime, amc, deepscaler, "
             "openr1-math, humaneval, mbpp, apps, taco, verl (docs/data.md)", "NAME"),
    ),
    "sft": (
        Flag("--model", "run.model", "Hugging Face model or r1mega checkpoint", "DIR"),
        Flag("--data", "sft.data", "SFT rows .jsonl/.json/.parquet: prompt + completion, or messages", "FILE"),
    ),
    "synth": (
        Flag("--n", "synth.n", "number of problems (default 100)", "N"),
        Flag("--difficulty", "synth.difficulty", "task difficulty (default 1)", "N"),
        Flag("--seed", "run.seed", "seed of the problems (default 0)", "N"),
        Flag("--split", "synth.split", "train (default) or test", "SPLIT"),
        Flag("--style", "synth.style", "solution format: r1-zero (default: <think> then <answer>) or r1", "STYLE"),
    ),
    "convert": (
        Flag("--tp", "parallel.tp", "tensor-parallel size (default 1)", "N"),
        Flag("--pp", "parallel.pp", "pipeline-parallel size (default 1)", "N"),
        Flag("--ep", "parallel.ep", "expert-parallel size (default 1)", "N"),
        Flag("--etp", "parallel.etp", "expert tensor-parallel size (default: tp)", "N"),
        Flag("--dtype", "convert.dtype", "megatron parameter dtype: float32, bfloat16 or float16 (default: the "
             "config's)", "DTYPE"),
    ),
    "pretrain": (
        Flag("--out", "pretrain.out", "write it here instead of the cache", "DIR"),
        Flag("--steps", "pretrain.steps", "pretraining steps (default 1400)", "N"),
    ),
    "sample": (
        Flag("--model", "run.model", "a Hugging Face model directory (e.g. a run's final/); required", "DIR"),
        Flag("--data", "run.data", "prompts with gold answers (or tests); default: the embedded task's train split",
             "FILE"),
        Flag("--format", "data.format", "the files' published format: r1mega (default), gsm8k, math, aime, amc, deepscaler, "
             "openr1-math, humaneval, mbpp, apps, taco, verl (docs/data.md)", "NAME"),
        Flag("--samples", "sample.samples", "k completions per prompt (default 8)", "K"),
        Flag("--max-per-prompt", "sample.max_per_prompt", "most completions kept per prompt (default 4)", "N"),
        Flag("--temperature", "sample.temperature", "sampling temperature (default 0.7)", "T"),
        Flag("--top-p", "sample.top_p", "nucleus mass (default 0.95)", "P"),
        Flag("--max-new-tokens", "sample.max_new_tokens", "longest completion sampled (default 1024)", "N"),
        Flag("--max-tokens", "sample.max_tokens", "longest completion kept (default: no bound but the budget)", "N"),
        Flag("--min-language", "sample.min_language", "language consistency needed where a prompt names a "
             "language (default 0.95)", "X"),
        Flag("--max-repeats", "sample.max_repeats", "copies in a row of one span that count as runaway repetition "
             "(default 4)", "N"),
        Flag("--judge", "sample.judge", "judge(record, completion) -> bool for prompts no rule verifies (task "
             "'general')", "MODULE:FUNCTION"),
        Flag("--max-prompts", "sample.max_prompts", "sample the first N prompts only", "N"),
        Flag("--template", "run.template", "r1_zero (default), chat or raw", "NAME"),
        Flag("--format-style", "rewards.format_style", "answer-tags (R1-Zero, default) or summary (R1)", "STYLE"),
        Flag("--seed", "run.seed", "sampling seed (default 0)", "N"),
    ),
    "rm": (
        Flag("--model", "run.model", "a causal-LM Hugging Face directory (or r1mega checkpoint) whose backbone gets a "
             "new score head; default: the embedded base model", "DIR"),
        Flag("--data", "rm.data", "train pairs: prompt, chosen, rejected (.jsonl/.json/.parquet); default: the "
             "embedded general prompts' train pairs", "FILE"),
        Flag("--heldout", "rm.heldout", "held-out pairs to measure pair accuracy on; default: the embedded test "
             "pairs without --data, none with it", "FILE"),
        Flag("--epochs", "rm.epochs", "passes over the train pairs (default 4)", "N"),
        Flag("--lr", "rm.lr", "AdamW learning rate (default 5e-4)", "LR"),
        Flag("--batch-size", "rm.batch_size", "pairs per step (default 8)", "N"),
        Flag("--max-length", "rm.max_length", "tokens kept per prompt + completion, the last ones (default 4096, "
             "RewardModel's)", "N"),
        Flag("--seed", "run.seed", "draws the score head and the shuffles (default 0)", "N"),
    ),
    "distill": (
        Flag("--samples", "distill.samples", "teacher completions per prompt (default 4)", "K"),
        Flag("--max-per-prompt", "distill.max_per_prompt", "most traces kept per prompt (default 2)", "N"),
        Flag("--temperature", "distill.temperature", "teacher sampling temperature (default 0.7; evaluation keeps "
             "R1's 0.6)", "T"),
        Flag("--max-prompts", "distill.max_prompts", "first N training prompts (embedded default: all 3670)", "N"),
        Flag("--max-heldout", "distill.max_heldout", "first N held-out problems (embedded default: 100)", "N"),
        Flag("--max-new-tokens", "distill.max_new_tokens", "teacher and evaluation budget (default 96)", "N"),
        Flag("--eval-samples", "eval.samples", "k samples per held-out problem (default 4)", "K"),
        Flag("--format-style", "distill.format_style", "summary (R1, default) or answer-tags (R1-Zero)", "STYLE"),
        Flag("--seed", "run.seed", "sampling seed (default 0)", "N"),
    ),
    "eval": (
        Flag("--data", "run.heldout", "problems with gold answers (.jsonl/.json/.parquet, shards, save_to_disk); "
             "default: the embedded task's held-out split", "FILE"),
        Flag("--format", "data.format", "the files' published format: r1mega (default), gsm8k, math, aime, amc, deepscaler, "
             "openr1-math, humaneval, mbpp, apps, taco, verl (docs/data.md)", "NAME"),
        Flag("--samples", "eval.samples", "k samples per problem", "K"),
        Flag("--temperature", "eval.temperature", "sampling temperature of the k samples", "T"),
        Flag("--top-p", "eval.top_p", "nucleus mass of the k samples", "P"),
        Flag("--max-new-tokens", "eval.max_new_tokens", "longest completion (default: rollout.max_new_tokens)", "N"),
        Flag("--max-prompts", "eval.max_prompts", "evaluate the first N problems only", "N"),
        Flag("--no-greedy", "eval.greedy", "skip the greedy pass", const=False),
        Flag("--template", "run.template", "r1_zero (default), chat or raw", "NAME"),
        Flag("--format-style", "rewards.format_style", "answer-tags (R1-Zero, default) or summary (R1)", "STYLE"),
        Flag("--seed", "run.seed", "sampling seed (default 0)", "N"),
    ),
    "pipeline": (
        Flag("--out", "pipeline.out", "where every stage writes (default runs/r1-pipeline); run again to resume",
             "DIR"),
        Flag("--base-model", "pipeline.base_model", "the base model stages 1 and 3 fine-tune (default: the embedded "
             "base the pretrain section describes)", "DIR"),
    ),
    "plan": (
        Flag("--nnodes", "plan.nnodes", "nodes (default 1)", "N"),
        Flag("--nproc-per-node", "plan.nproc_per_node", "processes per node (default 1)", "N"),
        Flag("--full", "plan.full", "one row per rank even for a large world", const=True),
    ),
}

# command -> (module, function, the command-line-only arguments passed to it as keywords). The
# function takes the resolved Config first; with --quiet in its parser it also gets progress=.
COMMANDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "reward": ("r1mega.rewards.score_file", "reward_command", ("data", "completions", "out")),
    "synth": ("r1mega.data.synthetic", "synth_command", ("task", "out", "solutions")),
    "convert": ("r1mega.models.convert", "convert_command", ("hf", "megatron", "to_megatron", "to_hf")),
    "pretrain": ("r1mega.run.base_model", "pretrain_command", ()),
    "sample": ("r1mega.rejection.sample", "sample_command", ("out",)),
    "rm": ("r1mega.rm.train", "rm_command", ("out",)),
    "distill": ("r1mega.distill", "distill_command", ("teacher", "student", "data", "heldout", "traces", "out")),
    "eval": ("r1mega.evaluation.run", "eval_command", ("model", "embedded", "out", "benchmark")),
    "pipeline": ("r1mega.pipeline", "pipeline_command", ()),
    "plot": ("r1mega.plot", "plot_command", ("run", "out")),
    "plan": ("r1mega.launch_plan", "plan_command", ("launch", "plan_json")),
}


def _config_options(default: typing.Any) -> argparse.ArgumentParser:
    # Subcommands take the same options with SUPPRESS defaults, so values given before the
    # subcommand are not overwritten by the subparser's defaults.
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--recipe", default=default,
                        help=f"named recipe (default: {DEFAULT_RECIPE}; for sft and distill: {DEFAULT_SFT_RECIPE}; "
                             "for pipeline: r1)")
    parent.add_argument("--config", metavar="FILE", default=default,
                        help="JSON config applied over the recipe")
    parent.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                        default=[] if default is None else default,
                        help="override one field, e.g. --set grpo.eps_high=0.28 (repeatable; a flag that is an "
                             "alias of the same key wins)")
    parent.add_argument("--dry-run", action="store_true", default=False if default is None else default,
                        help="validate the resolved config, print it as JSON and exit")
    return parent


def _add_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """The command's key-alias flags (FLAG_KEYS); given ones only reach the namespace."""
    for f in FLAG_KEYS[command]:
        text = f"{f.help} [{f.key}]" if f.help else f"sets {f.key}"
        if f.const is not None:
            parser.add_argument(f.flag, dest=f.dest, action="store_const", const=f.const,
                                default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(f.flag, dest=f.dest, metavar=f.metavar, default=argparse.SUPPRESS, help=text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r1mega", description="GRPO training for the DeepSeek-R1 recipe.",
                                     parents=[_config_options(None)])
    sub = parser.add_subparsers(dest="command")
    config_options = _config_options(argparse.SUPPRESS)

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[config_options], **kwargs)
        if name in FLAG_KEYS:
            _add_flags(p, name)
        return p

    reward = command("reward", help="score a file of completions and print a summary per reward")
    reward.add_argument("--data", required=True, metavar="FILE", help="prompt dataset (.jsonl/.json/.parquet)")
    reward.add_argument("--completions", required=True, metavar="FILE",
                        help='rows {"id": <prompt id>, "completion": <text>}')
    reward.add_argument("--out", metavar="FILE", help="write one JSON line of scores per completion")

    synth = command("synth", help="write a shipped synthetic task as a prompt dataset")
    synth.add_argument("task", help="arithmetic, countdown or programming")
    synth.add_argument("--out", required=True, metavar="FILE", help="prompt dataset to write (.jsonl)")
    synth.add_argument("--solutions", metavar="FILE", help="also write the reference solutions as completions")

    convert = command(
        "convert", help="convert a Hugging Face safetensors directory to a megatron checkpoint or back",
        description="Hugging Face safetensors <-> megatron distributed checkpoint. Runs as one process "
        "(tp=pp=ep=1) or under torchrun with one process per rank of the layout (parallel.*); the megatron "
        "checkpoint loads into any layout. --hf DIR --to-hf OUT passes through megatron in memory.")
    source = convert.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", metavar="DIR", help="Hugging Face model directory (config.json + safetensors)")
    source.add_argument("--megatron", metavar="DIR", help="a checkpoint written by --to-megatron")
    target = convert.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-megatron", metavar="OUT", help="write a megatron checkpoint (needs --hf)")
    target.add_argument("--to-hf", metavar="OUT", help="write a Hugging Face safetensors directory")

    train = command("train", help="run GRPO (R1-Zero) training; with no model and data, the embedded tiny default")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress line")

    sft = command("sft", help="supervised fine-tuning (cold start, stage 3, distillation); with no model and "
                              "data, the embedded cold start")
    sft.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    sft.add_argument("--quiet", action="store_true", help="no progress line")

    command("pretrain", help="build the embedded base model (tokenizer + tiny MoE) into the cache (the pretrain "
                             "section)")

    plot = command("plot", help="draw a run's curves into RUN/curves.png")
    plot.add_argument("run", metavar="RUN", help="a run directory")
    plot.add_argument("--out", metavar="FILE", help="PNG to write (default RUN/curves.png)")

    ev = command("eval", help="pass@1, cons@k, greedy accuracy, format and language rates of a model on problems "
                              "with gold answers (R1's protocol, the eval section: the trainer's held-out evaluation)")
    ev.add_argument("--model", required=True, metavar="DIR", help="a Hugging Face model directory (e.g. a run's final/)")
    ev.add_argument("--embedded", choices=("addition", "r1"), default="addition",
                    help="without --data: the embedded held-out split to use: addition (R1-Zero's task, English) or "
                         "r1 (the R1 stages': English and Chinese prompts)")
    ev.add_argument("--benchmark", choices=sorted(BENCHMARKS), metavar="NAME",
                    help="R1's protocol for a published benchmark, your local copy in --data: "
                         f"{', '.join(sorted(BENCHMARKS))} (sets data.format, eval.samples, T 0.6, top-p 0.95, "
                         "eval.max_new_tokens 32768; --set and flags override it; docs/data.md)")
    ev.add_argument("--out", metavar="DIR", help="write summary.json and problems.jsonl there")
    ev.add_argument("--quiet", action="store_true", help="no progress line")
    sm = command("sample", help="rejection sampling: verified, readable completions of a model as SFT data")
    sm.add_argument("--out", required=True, metavar="FILE", help="SFT JSONL to write (report: FILE.report.json)")
    sm.add_argument("--quiet", action="store_true", help="no progress line")
    rm = command("rm", help="train a reward model (Bradley-Terry) on preference pairs")
    rm.add_argument("--out", required=True, metavar="DIR", help="the reward model's directory to write (must not "
                    "exist)")
    rm.add_argument("--quiet", action="store_true", help="no progress line")
    pl = command("pipeline", help="the whole DeepSeek-R1 recipe (cold start, reasoning RL, rejection sampling + "
                                  "SFT, reward model, all-scenario RL, distillation) on the embedded default",
                 description="CONFIG (--recipe, default r1) is the pipeline's own (the pipeline section); each "
                 "stage runs its named recipe (r1mega.pipeline.STAGE_RECIPES).")
    pl.add_argument("--quiet", action="store_true", help="no stage lines")
    ds = command("distill", help="distillation (R1): SFT of a small dense student on a teacher's rejection-sampled "
                                 "traces; held-out figures of the student base, the student and the teacher",
                 description="CONFIG (--recipe, default tiny-cold-start; --config; --set) is the student's "
                 "SFT config and holds distill's settings (the distill section; the evaluation: eval.*). Run again "
                 "with the same arguments to resume.")
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
    ds.add_argument("--quiet", action="store_true", help="no progress lines")
    plan = command("plan", help="the per-rank plan of a torchrun/Slurm launch of a command, checked "
                   "against its config and model (no GPU, no cluster; DRY_RUN=1 of the launchers)")
    plan.add_argument("--launch", action="append", metavar="CMD", help="the command node i runs (the i-th "
                      "--launch; the launchers pass them)")
    plan.add_argument("--plan-json", metavar="FILE", help="also write the whole plan (every rank and node) as JSON")
    plan.add_argument("command_args", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                      help="the r1mega command and its arguments, e.g. train --set parallel.tp=2")
    sub.add_parser("recipes", help="list the named recipes")
    sub.add_parser("keys", help="list every config key with its type, default and documentation, the key aliases "
                                "and the flags that are aliases of keys")
    return parser


def resolve_config(recipe: str, config_file: str | None, overrides: list[str]) -> Config:
    """The config that a run with these arguments uses."""
    cfg = get_recipe(recipe)
    if config_file:
        cfg = cfg.with_file(config_file)
    return cfg.with_overrides(overrides)


def flag_values(command: str, args: argparse.Namespace) -> dict[str, typing.Any]:
    """{key: typed value} of the command's key-alias flags given in `args` (FLAG_KEYS)."""
    values = {}
    for f in FLAG_KEYS.get(command, ()):
        if not hasattr(args, f.dest):
            continue
        value = getattr(args, f.dest)
        try:
            values[f.key] = parse_value(f.key, value) if isinstance(value, str) else value
        except ConfigError as err:
            raise ConfigError(f"{f.flag}: {err}") from None
    return values


def command_config(args: argparse.Namespace) -> Config:
    """The config the parsed command `args` runs with: the recipe (the command's default,
    DEFAULT_RECIPES), the --config file (a resumed run's config.json with --resume), the --set
    overrides, then the command's flags that are aliases of keys (a flag wins over --set)."""
    config_file = args.config
    recipe = args.recipe or DEFAULT_RECIPES.get(args.command, DEFAULT_RECIPE)
    if args.command in ("train", "sft") and args.resume and config_file is None:
        config_file = str(Path(args.resume) / "config.json")
        if not Path(config_file).is_file():
            raise ConfigError(f"--resume {args.resume}: no config.json there (not a run directory)")
    benchmark = getattr(args, "benchmark", None)
    if benchmark is None:
        cfg = resolve_config(recipe, config_file, args.overrides)
    else:  # the preset sits between the recipe (and config file) and --set
        if getattr(args, "data", None) is None:
            raise ConfigError(f"--benchmark {benchmark}: give --data FILE, your local copy of the benchmark in its "
                              "published format (docs/data.md)")
        cfg = resolve_config(recipe, config_file, []).with_values(BENCHMARKS[benchmark].config_values())
        cfg = cfg.with_overrides(args.overrides)
    try:
        values = flag_values(args.command, args)
        return cfg.with_values(values) if values else cfg
    except ConfigError as err:  # name the flag the bad value came from
        flags = {f.key: f.flag for f in FLAG_KEYS.get(args.command, ())}
        key = str(err).split(":", 1)[0]
        raise ConfigError(f"{flags[key]}: {err}" if key in flags and key in values else str(err)) from None


def _list_recipes() -> str:
    width = max(map(len, RECIPES))
    return "\n".join(f"{name:<{width}}  {summary(name)}" for name in sorted(RECIPES))


def _list_keys() -> str:
    """Every key by section (type, default, doc), the moved keys and the flags that are keys."""
    lines = []
    defaults = Config()
    for section in dataclasses.fields(Config):
        obj = getattr(defaults, section.name)
        doc = " ".join((type(obj).__doc__ or "").split())
        lines.append(f"[{section.name}]" + (f" {doc}" if doc and not doc.startswith(type(obj).__name__ + "(") else ""))
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            hint = hints[f.name]
            tp = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            lines.append(f"{section.name}.{f.name}  ({tp}, default {getattr(obj, f.name)!r})\n"
                         f"    {f.metadata['doc']}")
    lines.append("\nkey aliases (old key -> key; accepted by --set, --config files and older runs' config.json):")
    lines += [f"  {old} -> {new}" for old, new in KEY_ALIASES.items()]
    lines.append("\nflags that are aliases of keys (command flag -> key; a flag wins over --set):")
    for command, flags in FLAG_KEYS.items():
        lines += [f"  {command} {f.flag} -> {f.key}" + (f"={str(f.const).lower()}" if f.const is not None else "")
                  for f in flags]
    return "\n".join(lines)


def _call(args: argparse.Namespace, cfg: Config, **extra: typing.Any) -> int:
    """Run a command's function (COMMANDS) with the Config and its command-line-only arguments."""
    module, name, arg_names = COMMANDS[args.command]
    kwargs = {a: getattr(args, a, None) for a in arg_names}
    if hasattr(args, "quiet"):
        kwargs["progress"] = not args.quiet
    return getattr(importlib.import_module(module), name)(cfg, **kwargs, **extra)


def _plan(args: argparse.Namespace, cfg: Config) -> int:
    """plan: the inner command is parsed and its config resolved as that command would."""
    import warnings

    warnings.filterwarnings("ignore", module=r"megatron\.")  # its import-time notes about TE/Apex
    argv = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
    inner = _parser().parse_args(argv)  # bad arguments exit 2 with usage, as the command itself would
    if inner.command not in ("train", "sft", "convert"):
        raise ValueError(f"plan: {inner.command or 'no command'!r} is not a distributed command; "
                         "train, sft and convert run under torchrun")
    return _call(args, cfg, command=inner.command, command_cfg=command_config(inner),
                 hf=getattr(inner, "hf", None), megatron=getattr(inner, "megatron", None))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "recipes":
        print(_list_recipes())
        return 0
    if args.command == "keys":
        print(_list_keys())
        return 0
    try:
        cfg = command_config(args)
        if args.dry_run or args.command is None:
            if args.dry_run:
                sys.stdout.write(cfg.to_json())
                return 0
            print("r1mega: error: no command; `r1mega train` runs the main job, `r1mega --help` lists the others",
                  file=sys.stderr)
            return 2
        if args.command == "sft":
            from r1mega.sft.loop import sft

            sft(cfg, resume=args.resume, progress=not args.quiet)
            return 0
        if args.command == "train":
            from r1mega.trainer.loop import StepFailed, train

            try:
                train(cfg, resume=args.resume, progress=not args.quiet)
            except StepFailed as err:
                print(f"r1mega: error: {err}", file=sys.stderr)
                return 1
            return 0
        if args.command == "plan":
            return _plan(args, cfg)
        return _call(args, cfg)
    except (ConfigError, DataError, ValueError, FileNotFoundError) as err:
        print(f"r1mega: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
