"""REPORT.md and plots of a suite run (`domix bench quality --preset commonsense`): per-task accuracy by both
scoring protocols beside chance, the verdicts, the cost of each method against DoRA, the rates chosen on dev
— from results.json alone."""
from __future__ import annotations

import statistics
from pathlib import Path

from ...io import save_figure
from .report_tables import (_num, _params, _secs, _step, claim_verdicts, metric_table, run_header, selection_section,
                            write_markdown)

PROTOCOLS = {"accuracy": "answer extraction from the greedy generation (the paper's protocol)",
             "accuracy_loglik": "the most likely answer sentence (\"the correct answer is answer2\") by summed "
                                "log-likelihood",
             "accuracy_cloze": "the most likely option text after the bare question (lm-evaluation-harness's cloze "
                               "scoring)"}
VERDICT_KEYS = {"accuracy": "verdicts", "accuracy_loglik": "verdicts_loglik", "accuracy_cloze": "verdicts_cloze"}
REFERENCE = "base-dora-rank"  # the efficiency ratios' reference: DoRA at DoMIX's update rank


def chance_row(results: dict, tasks: list[str]) -> str:
    chance = [results["data"]["tasks"][t].get("chance") for t in tasks]
    mean = f"{statistics.mean(chance):.3f}" if all(c is not None for c in chance) else "—"
    return "| chance | " + " | ".join(_num(c) for c in chance) + f" | {mean} |"


def accuracy_table(results: dict, metric: str) -> str:
    """`metric_table` with chance as its last row."""
    return metric_table(results, metric) + "\n" + chance_row(results, list(results["tasks"]))


def efficiency_section(results: dict) -> list[str]:
    """Per method: trainable parameters, fine-tuning step time and peak memory, each also as a ratio to DoRA at
    DoMIX's rank; the total compute, the modules' training included."""
    eff = results.get("efficiency", {})
    if not eff:
        return []
    ref = eff.get(REFERENCE)
    ratio = lambda m, k: (f"{eff[m][k] / ref[k]:.2f}" if ref and ref.get(k) and eff[m].get(k) else "—")  # noqa: E731
    L = ["## Efficiency: fine-tuning cost, and the total with the modules' training", "",
         f"| method | trainable | step (CPU) | × {REFERENCE} | peak RSS | × {REFERENCE} | fine-tune CPU | "
         "modules CPU | total CPU |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for m, e in eff.items():
        L.append(f"| {m} | {_params(e['trainable_params'])} | {_step(e['step_time_s'], e.get('step_cpu_s'))} | "
                 f"{ratio(m, 'step_cpu_s')} | {_num(e['peak_rss_mb'], 0)} MB | {ratio(m, 'peak_rss_mb')} | "
                 f"{_secs(e.get('finetune_cpu_s'))} | {_secs(e.get('pretrain_cpu_s'))} | "
                 f"{_secs((e.get('finetune_cpu_s') or 0) + (e.get('pretrain_cpu_s') or 0))} |")
    return L + ["", "Step: the median wall time of an optimizer step after the first, and in brackets its CPU time; "
                f"the ratios are of CPU step time and of peak RSS to {REFERENCE} (DoRA of DoMIX's update rank), "
                "measured in the same run. Peak RSS is the fine-tuning process's, scoring included, with a few hundred "
                "MB of libraries common to every method. Fine-tune CPU: per run, with loading and scoring; modules "
                "CPU: the training of every module the method mixes (DoMIX's modules are trained once and serve "
                "every later task, but this run pays for them).", ""]


def kept_section(results: dict) -> list[str]:
    ft = results["settings"]["finetune"]
    runs = [r for r in results.get("runs") or [] if "kept_step" in r]
    first = {}
    for r in runs:  # a suite's run is listed once per task
        first.setdefault((r["method"], r["seed"]), r)
    if not ft.get("keep_best") or not first:
        return []
    L = [f"## Training to the best dev loss (dev every {ft['eval_every']} steps, patience {ft.get('patience')}, at most "
         f"{ft['epochs']:g} epochs)", "", "| method | kept step | steps allowed | dev accuracy | dev accuracy (loglik) |",
         "|---|---|---|---:|---:|"]
    for m in results["methods"]:
        rs = [r for (mm, _), r in first.items() if mm == m]
        if rs:
            L.append(f"| {m} | {', '.join(str(r['kept_step']) for r in rs)} | {rs[0]['max_steps']} | "
                     f"{statistics.mean(r['dev_accuracy'] for r in rs):.3f} | "
                     + (f"{statistics.mean(r['dev_accuracy_loglik'] for r in rs):.3f}" if all(
                         'dev_accuracy_loglik' in r for r in rs) else "—") + " |")
    return L + ["", "Dev is the union of the tasks' dev sets: scored by loss during training (the lowest kept), by "
                "both protocols at the end (the rate grid reads its accuracy).", ""]


def _plot(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = list(results["tasks"])
    methods = [m for m in results["methods"] if any(m in results["tasks"][t] for t in tasks)]
    if not tasks or not methods:
        return []
    fig, axes = plt.subplots(2, 1, figsize=(1.3 * len(tasks) * max(1, len(methods) / 5) + 3, 7), squeeze=False)
    colors = plt.cm.tab20(np.linspace(0, 1, max(1, len(methods))))
    w = 0.8 / len(methods)
    for ax, metric in zip(axes[:, 0], PROTOCOLS):
        for i, m in enumerate(methods):
            ys = [results["tasks"][t].get(m, {}).get(metric, {}).get("mean", np.nan) for t in tasks]
            ax.bar(np.arange(len(tasks)) + (i - (len(methods) - 1) / 2) * w, ys, w, label=m, color=colors[i],
                   edgecolor="k" if m == "domix" else "none")
        for j, t in enumerate(tasks):
            c = results["data"]["tasks"][t].get("chance")
            if c is not None:
                ax.hlines(c, j - 0.45, j + 0.45, colors="k", linestyles="dashed", linewidth=0.8)
        ax.set_xticks(range(len(tasks)), tasks, fontsize=8)
        ax.set_ylabel("test " + ("accuracy (extraction)" if metric == "accuracy" else "accuracy (log-likelihood)"),
                      fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=min(5, len(methods)), loc="upper left", bbox_to_anchor=(0, 1.25))
    fig.suptitle("commonsense tasks (dashed: chance)", fontsize=9, y=0.995)
    fig.tight_layout()
    (out / "plots").mkdir(parents=True, exist_ok=True)
    save_figure(fig, out / "plots" / "tasks.png")
    return ["plots/tasks.png"]


def write_suite_report(results: dict, out: Path) -> str:
    """Write out/REPORT.md and out/plots/tasks.png of a suite run; return the main table."""
    out = Path(out)
    s = results["settings"]
    pre, ft = s["pretrain"], s["finetune"]
    table = accuracy_table(results, "accuracy")
    plots = _plot(results, out)
    sizes = ", ".join(f"{t} {v['test']['examples']}" for t, v in results["data"]["tasks"].items())
    union = results["data"]["union"]
    L = [f"# DoMIX LLM benchmark — the {s['suite']} suite (preset `{results['preset']}`)", "", *run_header(results)]
    if results["failures"]:
        L += ["## Failures", "", *[f"- `{n}`: {e}" for n, e in results["failures"].items()], ""]
    shown = [m for m in PROTOCOLS if any(m in by for t in results["tasks"].values() for by in t.values())]
    L += [f"Mean ± std over {len(results['seeds'])} seed(s); best per task in bold. zero-shot is the base model and "
          "own-module each task's module alone, neither fine-tuned. Nothing was chosen on the test sets: each run "
          "kept the step of its lowest dev loss, and each method's learning rates were chosen on dev accuracy"
          + (" by one grid (below)." if s.get("lr_grid") else "."), ""]
    for m in shown:
        L += [f"## Test accuracy, {PROTOCOLS[m]}", "", table if m == "accuracy" else accuracy_table(results, m), "",
              *(["An answer naming no option is wrong.", ""] if m == "accuracy" else [])]
    for i, m in enumerate(x for x in shown if VERDICT_KEYS[x] in results):
        L += [*claim_verdicts(results, VERDICT_KEYS[m], explain=i == 0,
                              title=f"## Verdicts ({PROTOCOLS[m].split(' (')[0]}): paired differences of test accuracy"), ""]
    L += [
          *efficiency_section(results), *selection_section(results), *kept_section(results),
          "## Settings", "",
          f"- Data: `domix fetch data commonsense` (the OLMo evaluation suite's requests, in the LLM-Adapters "
          f"instruction format); deterministic subsets in `{results['data']['key']}`: fine-tuning on the union of "
          f"{union['train']['examples']} training and {union['dev']['examples']} dev examples ({ft['train']} and "
          f"{ft['dev']} per task); test examples per task: {sizes}.",
          f"- Modules: one per task, a LoRA of rank {pre['rank']} (alpha {pre['alpha']:g}) trained on the task's "
          f"training text (prompt and answer) for {pre['steps']} steps × {pre['batch_size']} × {pre['seq_len']} tokens "
          f"at lr {pre['lr']:g}, {pre.get('dtype', 'fp32')}.",
          f"- Fine-tuning: at most {ft['epochs']:g} epochs of batch {ft['batch_size']}, max length {ft['max_seq_len']} "
          f"tokens (a longer prompt loses its start), the loss on the answer only, {ft.get('dtype', 'fp32')}; answers "
          f"of at most {ft.get('max_new_tokens', 32)} new tokens. LoRA and DoRA at rank {ft['base_lora_rank']} "
          + (f"and at DoMIX's update rank {s['capacity']['rank']} ({len(s['domains'])} modules × rank {pre['rank']})"
             if s.get("capacity") else "") + ", alpha 2 × rank.",
          f"- domix: the bridge initialised `{s['domix_defaults']['bridge_init']}`; domix-frozen-bridge keeps it "
          "frozen; domix-identity starts at P = I and domix-rank at P = I/(N·r), both trained (the paper's ablations).",
          f"- Preset `{results['preset']}` is small by necessity (2 CPU cores, a 135M model): differences of a few "
          "points on a hundred test examples per task are within noise; read the intervals above.", ""]
    write_markdown(out, L, plots)
    return table
