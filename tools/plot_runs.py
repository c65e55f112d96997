#!/usr/bin/env python
"""Overlay training runs in one PNG and print a comparison table.

    python tools/plot_runs.py runs/a runs/b [--out runs.png] [--labels A B] [--smooth 0.6] \
        [--positions positions.png [--eval a.json b.json]]

Reads each run directory's metrics.jsonl (and config.yaml for the tokens per step of runs that do not log
``tokens``). Three panels: loss against step, against tokens trained (log scale) and against wall time; the loss
axis is log-scaled when the loss spans more than a factor of 2. Evaluation points (``eval_loss``) are marked on the
same curves. A run that is still training can be plotted: a half-written last line is skipped.

Runs written before ``time_s`` and ``tokens`` were logged: tokens are step x tokens per step (from config.yaml and
the data-parallel size its checkpoints record), and such a run has no wall-time curve.

``--positions PNG`` draws the runs' loss by position in the context (the mean loss of the targets that see 1,
2-3, 4-7, ... tokens) on one plot: from each run's final evaluation (``result.json``), or from the files of
``python -m rtdist.evaluate --output`` given with ``--eval`` (one per run, e.g. the same split and stride for all).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rtdist.errors import ArgumentParser, DataError, UsageError, cli_main  # noqa: E402


@dataclass
class Run:
    label: str
    path: Path
    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    tokens: list[Optional[float]] = field(default_factory=list)
    time_s: list[Optional[float]] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)  # as logged (on log_interval steps)
    evals: list[dict] = field(default_factory=list)  # {"step", "tokens", "time_s", "loss", "bits_per_byte"}
    tokens_source: str = "logged"  # or how they were derived
    skipped_lines: int = 0


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """The logged steps in order; a step logged again (a run resumed from an earlier checkpoint) replaces what
    was logged from that step on. Returns (records, unreadable lines)."""
    records: list[dict] = []
    bad = 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1  # a line being written while we read, or a torn write of a killed run
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            bad += 1
            continue
        while records and records[-1]["step"] >= rec["step"]:
            records.pop()
        records.append(rec)
    return records, bad


def tokens_per_step(run_dir: Path) -> tuple[Optional[int], str]:
    """Tokens of one optimizer step from the run's config.yaml (all data-parallel ranks), and where the
    data-parallel size came from: ``train.train_batch_size`` when set, else the newest checkpoint's marker."""
    import yaml
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        return None, "no config.yaml"
    t = (yaml.safe_load(cfg_path.read_text()) or {}).get("train", {})
    seq = t.get("seq_length")
    if not seq:
        return None, "no train.seq_length in config.yaml"
    if t.get("train_batch_size"):
        return t["train_batch_size"] * seq, "config.yaml"
    per_rank = t.get("train_micro_batch_size_per_gpu", 1) * t.get("gradient_accumulation_steps", 1) * seq
    markers = {m.parent.name[len("global_step"):]: m for m in (run_dir / "checkpoints").glob("global_step*/complete")}
    for step in sorted((s for s in markers if s.isdigit()), key=int, reverse=True):  # the newest that says
        try:
            dp = json.loads(markers[step].read_text()).get("dp_size")
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(dp, int) and dp > 0:
            return per_rank * dp, f"config.yaml x data-parallel size {dp}"
    return per_rank, "config.yaml, data-parallel size unknown (taken as 1)"


def load_run(run_dir: Path, label: Optional[str] = None) -> Run:
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise DataError(f"run directory {run_dir} does not exist: pass the --run-dir of a python -m rtdist.train run")
    if not metrics.is_file():
        raise DataError(f"{metrics} does not exist: pass run directories written by python -m rtdist.train "
                        f"(--run-dir)")
    records, bad = read_metrics(metrics)
    if not records:
        raise DataError(f"{metrics} has no logged step yet" + (f" ({bad} unreadable lines)" if bad else ""))
    run = Run(label or run_dir.name, run_dir, skipped_lines=bad)
    per_step, source = (None, "") if all("tokens" in r for r in records) else tokens_per_step(run_dir)
    if per_step is not None:
        run.tokens_source = f"step x {per_step} ({source})"
    for r in records:
        tokens = r.get("tokens", r["step"] * per_step if per_step else None)
        if "loss" in r:
            run.step.append(r["step"])
            run.loss.append(float(r["loss"]))
            run.tokens.append(tokens)
            run.time_s.append(r.get("time_s"))
        if "tokens_per_s" in r:
            run.tokens_per_s.append(float(r["tokens_per_s"]))
        if "eval_loss" in r:
            run.evals.append({"step": r["step"], "tokens": tokens, "time_s": r.get("time_s"),
                              "loss": float(r["eval_loss"]), "bits_per_byte": r.get("eval_bits_per_byte")})
    return run


def summary(run: Run) -> dict:
    """One table row: final loss, best eval, steps, tokens, wall time, tokens/s."""
    best = min(run.evals, key=lambda e: e["loss"]) if run.evals else None
    bpb = [e["bits_per_byte"] for e in run.evals if e["bits_per_byte"] is not None]
    tokens = run.tokens[-1] if run.tokens else None
    time_s = run.time_s[-1] if run.time_s else None
    if tokens and time_s:
        tps = tokens / time_s
    else:  # older runs: the mean of the logged rates
        tps = sum(run.tokens_per_s) / len(run.tokens_per_s) if run.tokens_per_s else None
    return {"run": run.label, "final_loss": run.loss[-1] if run.loss else None,
            "best_eval_loss": best["loss"] if best else None, "best_eval_bpb": min(bpb) if bpb else None,
            "steps": run.step[-1] if run.step else 0, "tokens": tokens, "time_s": time_s, "tokens_per_s": tps}


def _fmt(v, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "int":
        return f"{int(v):,}"
    if kind == "time":
        return f"{v:.0f} s" if v < 600 else f"{v / 3600:.2f} h" if v >= 7200 else f"{v / 60:.1f} min"
    if kind == "rate":
        return f"{v:,.0f}"
    return f"{v:.4f}"


def table(rows: list[dict]) -> str:
    cols = [("run", "run", "str"), ("final_loss", "final loss", "f"), ("best_eval_loss", "best eval loss", "f"),
            ("best_eval_bpb", "best bits/byte", "f"), ("steps", "steps", "int"), ("tokens", "tokens", "int"),
            ("time_s", "wall time", "time"), ("tokens_per_s", "tokens/s", "rate")]
    cells = [[h for _, h, _ in cols]] + [[r[k] if kind == "str" else _fmt(r[k], kind) for k, _, kind in cols]
                                          for r in rows]
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(cols))]
    lines = []
    for j, c in enumerate(cells):
        lines.append("  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w)
                               for i, (x, w) in enumerate(zip(c, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def smoothed(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average with bias correction (the first points are not
    pulled toward 0)."""
    out, last, norm = [], 0.0, 0.0
    for v in values:
        last = last * weight + (1 - weight) * v
        norm = norm * weight + (1 - weight)
        out.append(last / norm)
    return out


def plot(runs: list[Run], out: Path, smooth: float = 0.6):
    """Write the three-panel PNG; returns the matplotlib figure (closed) for inspection."""
    try:
        import matplotlib
    except ImportError:
        raise DataError("plotting needs matplotlib: pip install matplotlib (or pip install -e '.[dev]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker as mticker

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    panels = [("step", "step", "linear"), ("tokens", "tokens trained", "log"), ("time_s", "wall time (s)", "linear")]
    losses = [v for r in runs for v in r.loss + [e["loss"] for e in r.evals] if math.isfinite(v) and v > 0]
    log_y = bool(losses) and max(losses) / min(losses) > 2
    for ax, (key, xlabel, xscale) in zip(axes, panels):
        drawn = False
        for i, run in enumerate(runs):
            color = f"C{i % 10}"
            pts = [(x, y) for x, y in zip(getattr(run, key), run.loss) if x is not None and (xscale != "log" or x > 0)]
            if not pts:
                continue
            xs, ys = zip(*pts)
            if smooth > 0 and len(ys) > 10:
                ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(xs, smoothed(list(ys), smooth), color=color, linewidth=1.6, label=f"{run.label} train")
            else:
                ax.plot(xs, ys, color=color, linewidth=1.4, label=f"{run.label} train")
            ev = [(e[key], e["loss"]) for e in run.evals if e[key] is not None and (xscale != "log" or e[key] > 0)]
            if ev:
                ex, ey = zip(*ev)
                ax.plot(ex, ey, color=color, linestyle="none", marker="o", markersize=6, markeredgecolor="black",
                        label=f"{run.label} eval")
            drawn = True
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, f"no {key} logged in these runs", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        ax.set_xscale(xscale)
        if log_y:  # plain numbers at 2, 3, 4, ... rather than 3 x 10^0
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(mticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(mticker.FormatStrFormatter("%g"))
    axes[0].set_ylabel("loss (nats/token)")
    axes[0].legend(fontsize=8)
    axes[0].set_title("loss vs step")
    axes[1].set_title("loss vs tokens")
    axes[2].set_title("loss vs wall time")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return fig


IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories (metrics.jsonl inside)")
    p.add_argument("--out", type=Path, default=Path("runs.png"), help="PNG to write (default runs.png)")
    p.add_argument("--labels", nargs="+", help="one name per run (default: the directory names)")
    p.add_argument("--smooth", type=float, default=0.6,
                   help="TensorBoard-style smoothing of the train loss in [0, 1) (0 = off; raw points stay faint)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.add_argument("--positions", type=Path, default=None,
                   help="also draw the runs' loss by position in the context to this PNG")
    p.add_argument("--eval", nargs="+", type=Path, default=None, metavar="EVAL_JSON",
                   help="with --positions: rtdist.evaluate --output files, one per run (default: result.json's "
                        "final evaluation)")
    p.add_argument("--debug", action="store_true", help="show the traceback of every error")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        raise UsageError(f"--labels has {len(args.labels)} names for {len(args.runs)} runs: give one per run")
    if not 0 <= args.smooth < 1:
        raise UsageError(f"--smooth {args.smooth}: must be in [0, 1)")
    if args.out.is_dir() or args.out.suffix.lower() not in IMAGE_SUFFIXES:  # matplotlib picks the format by it
        raise UsageError(f"--out {args.out}: name an image file ({', '.join(IMAGE_SUFFIXES)})")
    names = [r.name for r in args.runs]
    labels = args.labels or [str(r) if names.count(r.name) > 1 else r.name for r in args.runs]
    runs = [load_run(r, label) for r, label in zip(args.runs, labels)]
    plot(runs, args.out, args.smooth)
    rows = [summary(r) for r in runs]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(table(rows))
    for r in runs:
        notes = []
        if r.tokens_source != "logged":
            notes.append(f"tokens = {r.tokens_source}")
        if all(t is None for t in r.time_s):
            notes.append("no time_s logged: no wall-time curve")
        if r.skipped_lines:
            notes.append(f"{r.skipped_lines} unreadable line(s) skipped")
        if notes:
            print(f"  {r.label}: {'; '.join(notes)}")
    print(f"wrote {args.out} ({len(runs)} run{'s' if len(runs) > 1 else ''}: loss vs step, tokens and wall time; "
          f"{sum(len(r.evals) for r in runs)} eval points)")
    if args.positions:
        curves = positions_of(args.runs, labels, args.eval)
        from rtdist.evaluate import plot_loss_by_position
        plot_loss_by_position(curves, args.positions)
        print(f"wrote {args.positions} (loss by position: {', '.join(curves)})")
    return 0


def positions_of(run_dirs: list[Path], labels: list[str], eval_files: Optional[list[Path]]) -> dict:
    """label -> loss_by_position rows, from ``eval_files`` (one per run) or each run's result.json."""
    if eval_files is not None and len(eval_files) != len(run_dirs):
        raise UsageError(f"--eval has {len(eval_files)} files for {len(run_dirs)} runs: give one per run")
    curves = {}
    for i, (run_dir, label) in enumerate(zip(run_dirs, labels)):
        path = eval_files[i] if eval_files else run_dir / "result.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read it ({e})") from None
        rows = (data.get("eval") or {}).get("loss_by_position") if not eval_files else data.get("loss_by_position")
        if not rows:
            raise DataError(f"{path} has no loss_by_position: " + ("evaluate the run with python -m rtdist.evaluate "
                            "--output FILE and pass it with --eval" if not eval_files else
                            "write it with python -m rtdist.evaluate --output"))
        stride = f", stride {data['stride']}" if eval_files and "stride" in data else ""
        curves[f"{label}{stride}"] = rows
    return curves


if __name__ == "__main__":
    sys.exit(cli_main(main))
