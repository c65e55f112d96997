#!/usr/bin/env python
"""Routing vs local vs dense attention: a small, reproducible study (long-range retrieval + real text).

    python tools/experiment.py                      # the default study (configs/experiments/default.yaml)
    python tools/experiment.py --quick              # a few steps of everything: checks the pipeline, not the result
    python tools/experiment.py --tasks retrieval --variants local,routing_causal \\
        --set retrieval.task.seq_length=4096 --set retrieval.train.steps=2000 --out runs/exp-4k
    python tools/experiment.py --tasks retrieval --variants local,routing_causal --seeds 0-7   # OUT/seed-S/ each,
                                                    # OUT/seeds.md: mean, min and max over the seeds

Writes OUT/results.json (every number, the resolved config, the command), OUT/results.md (the tables) and
OUT/curves.png (learning curves), and prints the Markdown tables. The study itself is tools/study.py (its report
tools/study_report.py), on top of the installed rtdist package (make install).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from rtdist.config import MAX_SEED
from rtdist.errors import ArgumentParser, cli_main
from rtdist.fileio import atomic_write_text

from study import command_line, load_study, run_study
from study_report import seeds_markdown, summarise_seeds

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "configs" / "experiments" / "default.yaml"
QUICK = ROOT / "configs" / "experiments" / "quick.yaml"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=None,
                   help=f"study YAML; repeat to merge, later wins (default {DEFAULT.relative_to(ROOT)})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override, e.g. retrieval.train.steps=600 or variants.local.local_window_size=128")
    p.add_argument("--quick", action="store_true", help=f"merge {QUICK.relative_to(ROOT)} last: a few steps only")
    p.add_argument("--tasks", default=None, help="comma list of retrieval,text (default: the config's)")
    p.add_argument("--variants", default=None, help="comma list of variant names (default: all in the config)")
    p.add_argument("--seeds", default=None, type=parse_seeds, metavar="LIST",
                   help="run the whole study once per seed (e.g. 0-7 or 0,3,9) into OUT/seed-S/, then summarise "
                        "every final number over the seeds (mean, min, max) in OUT/seeds.md and OUT/seeds.json")
    p.add_argument("--out", type=Path, default=None, help="output directory (default runs/experiment[-quick])")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar over the training steps (default: when stderr is a terminal)")
    p.add_argument("--debug", action="store_true", help="show the traceback of every error")
    args = p.parse_args(argv)
    configs = [str(c) for c in (args.config or [DEFAULT])] + ([str(QUICK)] if args.quick else [])
    overrides = list(args.set)
    if args.tasks:
        overrides.append(f"tasks=[{args.tasks}]")
    out = args.out or ROOT / "runs" / ("experiment-quick" if args.quick else "experiment")
    study = load_study(configs, overrides)
    variants = args.variants.split(",") if args.variants else None
    t0 = time.time()
    command = command_line(["tools/experiment.py"] + argv)
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    if args.seeds is None:
        run_study(study, out, command=command, variants=variants, progress=progress)
        print("\n" + (out / "results.md").read_text())
        print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'curves.png'} in {time.time() - t0:.0f} s")
        return 0
    runs = {}
    for i, seed in enumerate(args.seeds):
        print(f"seed {seed} ({i + 1}/{len(args.seeds)}) -> {out / f'seed-{seed}'}", flush=True)
        runs[seed] = run_study(replace(study, seed=seed), out / f"seed-{seed}", command=command, variants=variants,
                               progress=progress)
    summary = summarise_seeds(runs)
    atomic_write_text(out / "seeds.json", json.dumps({"command": command, **summary}, indent=1))
    report = seeds_markdown(summary, command)
    atomic_write_text(out / "seeds.md", report)
    print("\n" + report)
    print(f"wrote {out / 'seeds.md'}, {out / 'seeds.json'} and {len(runs)} seed folders in {time.time() - t0:.0f} s")
    return 0


def parse_seeds(text: str) -> list[int]:
    """``0-7`` or ``0,3,9`` (or both: ``0-3,9``) -> the seeds, in order, each once."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            seeds += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected numbers and ranges such as 0-7 or 0,3,9") from None
    if not seeds or any(not 0 <= s <= MAX_SEED for s in seeds):
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: each seed must be in 0..{MAX_SEED}")
    return list(dict.fromkeys(seeds))


if __name__ == "__main__":
    sys.exit(cli_main(main))
