"""The `r1mega` command line.

    r1mega --recipe NAME [--config FILE] [--set section.field=value ...] --dry-run
    r1mega recipes          list the named recipes
    r1mega keys             list every config key with its type, default and documentation

A config is resolved in this order: the recipe (default: tiny), then a JSON config file (for
instance a run's saved config.json), then each --set in order. Errors are one line on stderr and
exit status 2, before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from r1mega.config import Config, ConfigError
from r1mega.recipes import RECIPES, get_recipe, summary

DEFAULT_RECIPE = "tiny"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="r1mega", description="GRPO training for the DeepSeek-R1 recipe.",
        epilog="Subcommands: 'r1mega recipes', 'r1mega keys'.")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"named recipe (default: {DEFAULT_RECIPE})")
    parser.add_argument("--config", metavar="FILE", help="JSON config applied over the recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field, e.g. --set grpo.eps_high=0.28 (repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the resolved config, print it as JSON and exit")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("recipes", help="list the named recipes")
    sub.add_parser("keys", help="list every config key with its type, default and documentation")
    return parser


def resolve_config(recipe: str, config_file: str | None, overrides: list[str]) -> Config:
    """The config that a run with these arguments uses."""
    cfg = get_recipe(recipe)
    if config_file:
        cfg = cfg.with_file(config_file)
    return cfg.with_overrides(overrides)


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
            tp = str(hints[f.name]).replace("typing.", "")
            if isinstance(hints[f.name], type):
                tp = hints[f.name].__name__
            lines.append(f"{section.name}.{f.name}  ({tp}, default {getattr(obj, f.name)!r})\n"
                         f"    {f.metadata['doc']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "recipes":
        print(_list_recipes())
        return 0
    if args.command == "keys":
        print(_list_keys())
        return 0
    try:
        cfg = resolve_config(args.recipe, args.config, args.overrides)
    except ConfigError as err:
        print(f"r1mega: error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        sys.stdout.write(cfg.to_json())
        return 0
    print("r1mega: error: this version has no training loop yet; "
          "use --dry-run to validate and print a config", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
