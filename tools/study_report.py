"""The study's report: ``results.md`` (the tables, what each number means, how to rerun) and ``curves.png`` (the
evaluation curves), both from the ``results`` dict that :func:`study.run_study` writes as ``results.json``."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional


def write_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("retrieval", "answer_acc", "retrieval: answer accuracy"),
              ("retrieval", "answer_loss", "retrieval: answer loss (nats)"),
              ("text", "val_bpb", "text: validation bits/byte")]
    panels = [p for p in panels if results["tasks"].get(p[0])]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 4), squeeze=False)
    for ax, (task, key, title) in zip(axes[0], panels):
        for name, r in results["tasks"][task].items():
            ax.plot([e["step"] for e in r["eval"]], [e[key] for e in r["eval"]], marker="o", ms=3, label=name)
        if key == "answer_acc":
            chance = 1.0 / results["config"]["retrieval"]["task"]["num_values"]
            ax.axhline(chance, color="gray", ls=":", lw=1, label="chance")
        if task == "retrieval":
            short = sum(p["steps"] for p in results["config"]["retrieval"]["train"]["curriculum"])
            if short:
                ax.axvline(short, color="gray", ls="--", lw=1, label="curriculum ends")
        ax.set_title(title + (" (full-sequence eval)" if task == "retrieval" else ""), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _steps_text(tr: dict, full_length: Optional[int] = None) -> str:
    phases = [f"{p['steps']} x {p['batch_size']} at {p['seq_length']}" for p in tr.get("curriculum") or []]
    main = f"{tr['steps']} x {tr['batch_size']}" + (f" at {full_length}" if full_length else "")
    return " then ".join(phases + [main]) + " (steps x sequences)"


def markdown_report(results: dict) -> str:
    cfg = results["config"]
    env = results["environment"]
    lines = ["# Routing vs local vs dense attention: small-scale study", "",
             f"Finished {results['finished']}, {results['wall_s']:.0f} s in all (torch {env['torch']}, "
             f"{cfg['threads']} threads on {env['cpus']} CPUs, load average at start {env['load_start']}, "
             f"at end {env['load_end']}). Seed {cfg['seed']}.", ""]
    notes = []
    r = results["tasks"].get("retrieval")
    if r:
        t = cfg["retrieval"]["task"]
        ev = cfg["retrieval"]["eval"]
        lines += ["## Long-range retrieval", "",
                  f"{t['num_pairs']} key/value definitions (`{t['order']}`) open each {t['seq_length']}-token "
                  f"sequence, {t['num_filler']} filler symbols follow, {t['num_queries']} queries `key value` close "
                  f"it: every answer is at least {results['retrieval_min_distance']} positions after its "
                  f"definition; local attention reaches at most {results['local_reach']} back. Chance: accuracy "
                  f"{1 / t['num_values']:.3f}, loss {math.log(t['num_values']):.3f}. Training: "
                  f"{_steps_text(cfg['retrieval']['train'], t['seq_length'])}, answer tokens only. Evaluation: "
                  f"{ev['batches'] * ev['batch_size'] * t['num_queries']} answers in "
                  f"{ev['batches'] * ev['batch_size']} held-out {t['seq_length']}-token sequences.", "",
                  "| variant | params | steps | causal | answer acc | answer loss | best acc (step) | "
                  "acc, definitions re-drawn | train s |",
                  "|---|---:|---:|:---:|---:|---:|---:|---:|---:|"]
        for name, v in r.items():
            fin = v.get("final_prefix_only", v["final"])
            best = max(v["eval"], key=lambda e: e["answer_acc"])
            mark = "" if v["causal"] else " *"
            lines.append(f"| {name} | {v['params']:,} | {v['final']['step']} | {'yes' if v['causal'] else 'no'} | "
                         f"{fin['answer_acc']:.3f}{mark} | {fin['answer_loss']:.3f}{mark} | "
                         f"{best['answer_acc']:.3f} ({best['step']}) | {v['control']['answer_acc']:.3f} | "
                         f"{v['wall_s']:.0f} |")
            if not v["causal"]:
                notes.append(f"\\* `{name}` is not causal (which earlier tokens a cluster keeps depends on later "
                             f"tokens): its answers are scored from their prefix alone. With the full sequence "
                             f"visible it scores acc {v['final']['answer_acc']:.3f}, loss "
                             f"{v['final']['answer_loss']:.3f}; the curves show full-sequence numbers.")
        notes.append("Control: *acc, definitions re-drawn* scores the same held-out sequences after drawing new values "
                     "for their definitions (the queries keep the old answers): a model that reads its answers from "
                     "the definitions falls to chance there.")
        for note in notes:
            lines += [note, ""]
    x = results["tasks"].get("text")
    if x:
        tr = cfg["text"]["train"]
        ev = cfg["text"]["eval"]
        corpus = results["text_data"]["corpus"]
        k = next(iter(x.values()))["sampled"]["positions_per_sample"]
        lines += ["## Real text (bytes tokenizer)", "",
                  f"Corpus: {corpus.get('dir')} ({corpus.get('bytes', 0) / 2 ** 20:.1f} MB of this machine's Python "
                  f"sources and docs), samples per split {results['text_data']['samples']}; "
                  f"{cfg['text']['seq_length']}-byte samples; training {_steps_text(tr)}; validation on the first "
                  f"{ev['batches'] * ev['batch_size']} validation samples.", "",
                  f"| variant | params | steps | causal | val bits/byte | val bits/byte, {k} positions/sample, "
                  f"prefix only | train s |", "|---|---:|---:|:---:|---:|---:|---:|"]
        for name, v in x.items():
            mark = "" if v["causal"] else " *"
            lines.append(f"| {name} | {v['params']:,} | {v['final']['step']} | {'yes' if v['causal'] else 'no'} | "
                         f"{v['final']['val_bpb']:.4f}{mark} | {v['sampled']['val_bpb']:.4f} | {v['wall_s']:.0f} |")
        if any(not v["causal"] for v in x.values()):
            lines += ["", "\\* not causal: the full-sequence number may use later bytes; compare the prefix-only "
                      "column (for causal variants it is their full-sequence logits at the same positions)."]
        lines.append("")
    lines += ["## Variants", "", "Each task's `model` block (in `config` of results.json) plus:", ""]
    for name, over in cfg["variants"].items():
        lines.append(f"- `{name}`: `{json.dumps(over)}`")
    lines += ["", "## Rerun", "", "```", results["command"], "```", "",
              "Every key of the study is in results.json under `config`; the same YAML scales up, e.g. "
              "`--set retrieval.task.seq_length=4096 --set retrieval.train.steps=2000 --set threads=16`.", ""]
    return "\n".join(lines)


def _final_figures(task: str, v: dict) -> dict:
    """The numbers a seed contributes to the summary: what the tables report as final."""
    fin = v.get("final_prefix_only", v["final"])
    if task == "retrieval":
        out = {"answer_acc": fin["answer_acc"], "best_acc": max(e["answer_acc"] for e in v["eval"]),
               "control_acc": v["control"]["answer_acc"]}
        out.update({k: v["final"][k] for k in v["final"] if k.endswith("_reach")})
        return out
    return {"val_bpb": v["final"]["val_bpb"]}


def summarise_seeds(runs: dict) -> dict:
    """``{seed: results}`` (each :func:`study.run_study`'s) -> every final figure of every task and variant over the
    seeds: the values in seed order, their mean, min and max."""
    seeds = list(runs)
    tasks: dict = {}
    for seed in seeds:
        for task, variants in runs[seed]["tasks"].items():
            for name, v in variants.items():
                for key, value in _final_figures(task, v).items():
                    tasks.setdefault(task, {}).setdefault(name, {}).setdefault(key, []).append(value)
    for variants in tasks.values():
        for figures in variants.values():
            for key, values in figures.items():
                figures[key] = {"values": values, "mean": sum(values) / len(values), "min": min(values),
                                "max": max(values)}
    return {"seeds": seeds, "tasks": tasks}


def seeds_markdown(summary: dict, command: str) -> str:
    seeds = summary["seeds"]
    lines = [f"# The study over {len(seeds)} seeds ({', '.join(map(str, seeds))})", "",
             "Each cell: mean [min, max] over the seeds; per-seed folders hold every number and curve.", ""]
    names = {"answer_acc": "answer acc", "best_acc": "best acc", "control_acc": "acc, definitions re-drawn",
             "val_bpb": "val bits/byte"}
    for task, variants in summary["tasks"].items():
        keys = list(dict.fromkeys(k for figures in variants.values() for k in figures))
        lines += [f"## {task}", "", "| variant | " + " | ".join(names.get(k, k.replace("_", " ")) for k in keys)
                  + " | per seed |", "|---|" + "---:|" * len(keys) + "---|"]
        main = "answer_acc" if task == "retrieval" else "val_bpb"
        for name, figures in variants.items():
            cells = [f"{f['mean']:.3f} [{f['min']:.3f}, {f['max']:.3f}]" if (f := figures.get(k)) else ""
                     for k in keys]
            per_seed = " ".join(f"{x:.3f}" for x in figures[main]["values"])
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {per_seed} |")
        lines.append("")
    lines += ["`lN reach`: the share of the evaluation's queries whose definition key layer N's routing puts in the "
              "query's cluster block or the one before (what causal routing lets it read).", "",
              "```", command, "```", ""]
    return "\n".join(lines)


def write_routing_plot(results: dict, path: Path) -> bool:
    """Per routing variant of the retrieval task, over training: answer accuracy with each layer's reach, each
    layer's largest cluster share, and how far each update moved the centroids. False when no variant routes."""
    runs = {name: r for name, r in results["tasks"].get("retrieval", {}).items()
            if any(k.endswith("_reach") for k in r["eval"][-1])}
    if not runs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 3, figsize=(15, 3.6 * len(runs)), squeeze=False)
    for row, (name, r) in zip(axes, runs.items()):
        layers = sorted({k.split("_")[0] for k in r["eval"][-1] if k.endswith("_reach")})
        steps = [e["step"] for e in r["eval"]]
        row[0].plot(steps, [e["answer_acc"] for e in r["eval"]], "k-o", ms=3, label="answer acc")
        for layer in layers:
            row[0].plot(steps, [e[f"{layer}_reach"] for e in r["eval"]], "--", label=f"{layer} reach")
        train_steps = [t["step"] for t in r["train"]]
        for layer in layers:
            row[1].plot(train_steps, [t[f"{layer}_max_share"] for t in r["train"]], lw=0.8, label=layer)
            row[2].plot(train_steps, [max(t[f"{layer}_move"], 1e-9) for t in r["train"]], lw=0.8, label=layer)
        row[2].set_yscale("log")
        for ax, title in zip(row, ("accuracy and reach", "largest cluster's share", "centroid move per update (1 - cos)")):
            ax.set_title(f"{name}: {title} (seed {results['config']['seed']})", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
