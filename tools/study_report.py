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
