"""Record a finished `r1mega pipeline` run under benchmarks/results/: one JSON line with the
command, the wall time, every stage's figures and wall time, the final table and its checks, and
the environment (benchmarks/results/r1_pipeline.jsonl), plus the table as text
(benchmarks/results/r1_pipeline_table.txt).

    python benchmarks/record_pipeline.py OUT_DIR --command "r1mega pipeline" --wall-s 1500

The pipeline is not re-run here: it takes about half an hour on 2 cores; run it, then record it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import RESULTS, append_jsonl, environment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the pipeline's output directory (holds manifest.json)")
    parser.add_argument("--command", required=True, help="the command that ran it, as typed")
    parser.add_argument("--wall-s", type=float, required=True, help="its measured wall time (seconds)")
    parser.add_argument("--note", default="", help="how it was run (fresh clone, empty cache, ...)")
    args = parser.parse_args()
    manifest = json.loads((Path(args.out) / "manifest.json").read_text())
    row = {"benchmark": "r1_pipeline", "command": args.command, "wall_s": args.wall_s, "note": args.note,
           "stages": {name: {k: e.get(k) for k in ("wall_s", "figures", "command")}
                      for name, e in manifest["stages"].items()},
           "table": manifest["table"], "checks": manifest["checks"], **environment()}
    append_jsonl(RESULTS / "r1_pipeline.jsonl", [row])
    (RESULTS / "r1_pipeline_table.txt").write_text(
        f"$ {args.command}   # {args.note}; {args.wall_s:.0f} s wall, {row.get('date', '')}\n"
        + manifest["table_text"] + "\n")
    print(manifest["table_text"])


if __name__ == "__main__":
    main()
