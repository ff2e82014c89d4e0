"""REPORT.md of `domix bench quality` — from results.json alone. Its shared pieces are in
`report_tables`, the MoDE sections in `report_mode`, the plots in `report_plots`; a suite's report
(the LLM setting) in `suite_report`."""
from __future__ import annotations

from pathlib import Path

from ...data.benchmark import GENERAL
from ...library.merge import DEFAULT_DENSITY
from .report_mode import lm_table, mode_comparison_section, mode_grid_section
from .report_plots import _plots
from .report_tables import (_mode_layout, _num, _params, _secs, _step, claim_verdicts, metric_table, run_header,
                            selection_section, unselected_verdicts, write_markdown)
from .settings import MERGES, compose_gate_lr


def verdicts(results: dict) -> list[str]:
    """Plain statements: on which task does DoMIX beat, or not beat, each other method (test macro-F1)."""
    shared = results.get("shared_runs", {})
    same = {m for m, o in shared.items() if o == "domix"} | {o for m, o in shared.items() if m == "domix"}
    out = []
    if same:
        out.append(f"- {', '.join(sorted(same))}: the same settings as domix, hence the same runs (not compared).")
    tasks = results["tasks"]
    for t, by in tasks.items():
        if "domix" not in by:
            continue
        d = by["domix"]["macro_f1"]
        wins, losses, ties = [], [], []
        for m, st in by.items():
            if m == "domix" or m in same or st["macro_f1"]["mean"] is None:
                continue
            o = st["macro_f1"]
            gap = d["mean"] - o["mean"]
            noise = max(d["std"], o["std"])
            note = f"{m} ({d['mean']:.3f} vs {o['mean']:.3f}" + (", within one std" if noise and abs(gap) <= noise
                                                                 else "") + ")"
            (wins if gap > 0 else ties if gap == 0 else losses).append(note)
        if losses:
            out.append(f"- **{t}**: DoMIX does **not** beat " + "; ".join(losses) + ".")
        if ties:
            out.append(f"- **{t}**: DoMIX ties " + "; ".join(ties) + " (does not beat).")
        if wins:
            out.append(f"- **{t}**: DoMIX beats " + "; ".join(wins) + ".")
    means = {m: sum(tasks[t][m]["macro_f1"]["mean"] for t in tasks) / len(tasks)
             for m in results["methods"] if all(m in tasks[t] for t in tasks)}
    if "domix" in means:
        below = [f"{m} ({v:.3f})" for m, v in means.items() if m != "domix" and m not in same and v >= means["domix"]]
        above = [m for m, v in means.items() if m != "domix" and m not in same and v < means["domix"]]
        out.append(f"- **Mean over tasks** (domix {means['domix']:.3f}): DoMIX is above {len(above)} of "
                   f"{len(above) + len(below)} other methods" + (f"; **not** above {', '.join(below)}." if below else "."))
    return out


def dap_curve_section(results: dict) -> list[str]:
    """The DAP-budget curve: held-out loss and dev gain of own-lora over base-lora per budget."""
    curve, chosen = results.get("dap_curve"), results["settings"].get("dap_budget")
    if not curve:
        return []
    doms = list(curve[0]["heldout_loss"])
    tasks = list(curve[0]["dev_macro_f1"])
    base = curve[0]["base_heldout_loss"]
    L = ["## DAP budget: task gain vs domain tokens (dev, first seed)", "",
         "| tokens per domain | " + " | ".join(f"{d} loss" for d in doms) + " | "
         + " | ".join(f"{t} own / base" for t in tasks) + " | mean dev gain |",
         "|---|" + "---|" * (len(doms) + len(tasks) + 1),
         "| 0 (base) | " + " | ".join(_num(base.get(d)) for d in doms) + " |" + " |" * len(tasks) + " |"]
    for p in curve:
        dev = p["dev_macro_f1"]
        cells = [f"{_num(dev.get(t, {}).get('own'))} / {_num(dev.get(t, {}).get('base'))}" for t in tasks]
        mark = "**" if chosen and p["tokens_per_domain"] == chosen["tokens_per_domain"] else ""
        L.append(f"| {mark}{p['tokens_per_domain']:,}{mark} | " + " | ".join(_num(p["heldout_loss"].get(d)) for d in doms)
                 + " | " + " | ".join(cells) + f" | {mark}{_num(p['mean_dev_gain'], 4)}{mark} |")
    L += ["", "Loss: each domain's own module on its held-out text (nats/token). own / base: dev macro-F1 of the "
          "task fine-tuned from its domain's module vs from the base model (same rank, same fine-tuning, the "
          "first seed)."]
    if chosen:
        L += [f"The run pre-trains at **{chosen['tokens_per_domain']:,} tokens per domain**: {chosen['how']}."]
    return L + [""]


def _auto_note(results: dict) -> str:
    """domix-auto-2: which modules `library rank` chose for each task, and whether its own domain led."""
    chosen = {r["task"]: r["modules_chosen"] for r in results.get("runs", [])
              if r["method"] == "domix-auto-2" and r.get("modules_chosen")}
    domains = results["settings"].get("task_domains", {})
    firsts = sum(1 for t, mods in chosen.items() if mods and mods[0] == domains.get(t))
    picks = "; ".join(f"{t}: {', '.join(m)}" for t, m in chosen.items())
    return (f"- domix-auto-2 bridges the 2 modules `library rank` scores best on each task's training text "
            f"(`finetune --modules auto:2`): {picks or 'no run finished'}"
            + (f" — the task's own domain ranked first for {firsts} of {len(chosen)} tasks." if chosen else "."))


def capacity_section(results: dict) -> list[str]:
    """The capacity-matched baselines' ranks and every method's trainable parameters."""
    cap = results["settings"].get("capacity")
    if not cap:
        return []
    eff = results.get("efficiency", {})
    L = ["## Capacity: trainable parameters and update rank", "",
         f"DoMIX over {cap['modules']} modules of rank {cap['module_rank']} trains {cap['domix_params']:,} parameters in "
         f"the bridged layers (the B's and P) with an update of rank {cap['rank']}. A LoRA of rank R trains "
         f"R × {cap['lora_params_per_rank']:,} there: the parameter-matched rank is **{cap['params']}** "
         f"({cap['params_lora']:,}), the rank-matched one **{cap['rank']}**. Computed from the base model's target "
         "layers (`capacity.py`), the task head left out (it is the same for every method).", "",
         "| method | trainable parameters (head included) | × DoMIX's |", "|---|---:|---:|"]
    ref = eff.get("domix", {}).get("trainable_params")
    for m in results["methods"]:
        if m in eff:
            n = eff[m]["trainable_params"]
            L.append(f"| {m} | {n:,} | {n / ref:.2f} |" if ref else f"| {m} | {n:,} | |")
    return L + [""]


def kept_steps_section(results: dict) -> list[str]:
    """Training to the best dev step: per method the mean kept step, the steps run and allowed."""
    ft = results["settings"]["finetune"]
    runs = results.get("runs") or []
    if not ft.get("keep_best") or not runs:
        return []
    import statistics

    L = [f"## Training to the best dev step (dev every {ft['eval_every']} steps, patience {ft.get('patience')}, "
         f"at most {ft['epochs']:g} epochs)", "",
         "| method | kept step (mean, min–max) | steps allowed | kept the last allowed step | dev macro-F1 at the kept step |",
         "|---|---|---|---|---|"]
    for m in results["methods"]:
        rs = [r for r in runs if r["method"] == m and r.get("order") in (None, ",".join(results["settings"]["orders"][0]))]
        if rs:
            ks = [r["kept_step"] for r in rs]
            last = sum(r["kept_step"] >= r["max_steps"] for r in rs)
            L.append(f"| {m} | {statistics.mean(ks):.1f} ({min(ks)}–{max(ks)}) | {max(r['max_steps'] for r in rs)} | "
                     f"{last} of {len(rs)} ({100 * last / len(rs):.0f} %) | {statistics.mean(r['dev_macro_f1'] for r in rs):.3f} |")
    return L + ["", "Every run is scored on test once, with the parameters of its best dev evaluation "
                "(`plots/dev_curves.png`: the first seed's dev curves).", ""]


def write_report(results: dict, out: Path) -> str:
    """Write out/REPORT.md and out/plots/*.png; return the main markdown table."""
    out = Path(out)
    s = results["settings"]
    if s.get("suite"):
        from .suite_report import write_suite_report

        return write_suite_report(results, out)
    pre, ft = s["pretrain"], s["finetune"]
    orders = [",".join(o) for o in s["orders"]]
    table = metric_table(results, "macro_f1")
    plots = _plots(results, out)
    n_seeds = len(results["seeds"])
    tokens = pre["steps"] * pre["batch_size"] * pre["seq_len"]
    L = [f"# DoMIX quality benchmark — preset `{results['preset']}`", "", *run_header(results)]
    if results["failures"]:
        L += ["## Failures", "", *[f"- `{n}`: {e}" for n, e in results["failures"].items()], ""]
    L += [f"## End tasks: test macro-F1 (mean ± std over {n_seeds} seed(s); best per task in bold)", "", table, "",
          "## End tasks: test accuracy", "", metric_table(results, "accuracy"), "",
          ("Nothing was chosen on the test sets: each run kept the step of its best dev macro-F1 (see below), "
           + ("the DAP budget was chosen on dev" if s.get("dap_budget") else "the DAP budget was set in the run's "
              "settings") + (", every method's learning rates were chosen on dev by one grid (below)."
                             if s.get("lr_grid") else ", the learning rates are standard values.")
           if ft.get("keep_best") else
           "Nothing was chosen on the test sets: there is no model selection at all (the last step is scored); "
           "the dev split is scored once at the end and reported in results.json (`dev_macro_f1`)."), "",
          *claim_verdicts(results), *unselected_verdicts(results), *capacity_section(results),
          *dap_curve_section(results), *mode_grid_section(results), *selection_section(results),
          *kept_steps_section(results), *mode_comparison_section(results),
          "## DoMIX against each other method (test macro-F1)", "", *verdicts(results), ""]
    lm = results["lm_loss"]
    if lm:
        L += ["## Did pre-training learn the domain? Held-out LM loss (nats/token, lower is better)", "",
              lm_table(results, "lm_loss")]
        if results.get("lm_accuracy"):
            L += ["", "Next-token accuracy on the same held-out text (higher is better; MoDE's paper reports this):",
                  "", lm_table(results, "lm_accuracy", 4)]
        ret = results["retention_loss"]
        det = results["lm_loss_detail"]
        mode_ret = [f"{label} {_num(ret[k])}" for k, label in (("mode-expert", "MoDE experts (mean)"),
                                                                 ("mode", "mode composed"),
                                                                 ("mode-frozen-experts", "mode-frozen-experts composed"),
                                                                 ("full", "all weights per domain (mean)"))
                    if k in ret]
        L += ["", f"General text (retention, {GENERAL} held-out): base {_num(ret.get('base'))}; "
              f"own modules {_num(ret.get('own-lora'))} (mean; "
              + ", ".join(f"{d} {_num(v)}" for d, v in det.get("own-lora", {}).items()) + f"); joint-lora "
              f"{_num(ret.get('joint-lora'))}"
              + ("; ncl " + ", ".join(f"[{o}] {_num(v)}" for o, v in det["ncl"].items()) if det.get("ncl") else "")
              + (("; " + "; ".join(mode_ret)) if mode_ret else "")
              + (". ncl is measured after its last domain." if det.get("ncl") else "."), ""]
        cross = det.get("cross", {})
        if cross:
            cols = list(next(iter(cross.values())))
            L += ["Each domain module on every held-out set (rows: module, columns: text):", "",
                  "| module | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
            L += [f"| {d} | " + " | ".join(_num(v.get(c)) for c in cols) + " |" for d, v in cross.items()]
            L.append("")
    rob, chk = results["order_robustness"], results.get("order_checks", {})
    if rob:
        L += ["## Order robustness (test macro-F1, first seed)", ""]
        cols = [(m, o) for m in ("domix", "ncl") if m in rob for o in rob[m]]
        L += ["| task | " + " | ".join(f"{m} [{o}]" for m, o in cols) + (" | ncl spread |" if "ncl" in rob else " |"),
              "|---|" + "---|" * (len(cols) + ("ncl" in rob))]
        for t in results["tasks"]:
            row = [_num(rob[m][o].get(t), 4) for m, o in cols]
            if "ncl" in rob:
                row.append(_num(chk.get("ncl", {}).get("spread", {}).get(t), 4))
            L.append(f"| {t} | " + " | ".join(row) + " |")
        L.append("")
        if "domix" in chk:
            c = chk["domix"]
            eq = c["modules_bitwise_equal"]
            L.append(f"DoMIX: the two libraries were trained in the orders {orders[0]} and {orders[1]} (separate "
                     f"directories and processes). Module tensors bitwise equal: "
                     + ", ".join(f"{d} {'yes' if v else 'NO'}" for d, v in eq.items())
                     + f". Scores identical across orders: **{'yes' if c['identical_scores'] else 'NO'}**. "
                     + ("The order-B fine-tunes ran for real." if c["order_b_finetuned"] else
                        "Because the modules are bitwise equal, the order-B fine-tunes are the same computation on "
                        "the same inputs and reuse the order-A runs (preset setting `order_check_finetune: false`; "
                        "the full preset runs them)."))
        if "ncl" in chk:
            L.append("ncl depends on the order: its spread is the max − min over orders of the first seed's score.")
        L.append("")
    eff = results["efficiency"]
    if eff:
        L += ["## Efficiency (each training in its own process; fine-tuning numbers are means per run)", "",
              "| method | trainable (fine-tune) | DAP time (CPU) | DAP step (CPU) | DAP peak RSS | fine-tune time (CPU) | "
              "fine-tune step (CPU) | fine-tune peak RSS |", "|---|---|---|---|---|---|---|---|"]
        for m, e in eff.items():
            dap = f"{_secs(e['pretrain_s'])} ({_secs(e.get('pretrain_cpu_s'))})" if e["pretrain_s"] else "—"
            L.append(f"| {m} | {_params(e['trainable_params'])} ({100 * e['trainable_params'] / e['total_params']:.2f}%)"
                     f" | {dap} | {_step(e.get('pretrain_step_time_s'), e.get('pretrain_step_cpu_s'))}"
                     f" | {_num(e['pretrain_peak_rss_mb'], 0)} MB | {_secs(e['finetune_s'])} "
                     f"({_secs(e.get('finetune_cpu_s'))}) | {_step(e['step_time_s'], e.get('step_cpu_s'))} | "
                     f"{_num(e['peak_rss_mb'], 0)} MB |")
        L += ["", "DAP time: the jobs' wall time, and in brackets their CPU time (process, data, training, save) — for "
              "the domix family, own-lora and the merge methods "
              "the four modules together (a merge's own time: `merge_s` in results.json), for joint-lora its one "
              "run, for ncl one order's four stages, for the "
              "MoDE methods the four experts and their composition (DAP step and trainable: the experts'). "
              "Fine-tune time includes loading, training, dev and test scoring. Step times are wall-clock medians "
              "after the first step, CPU step times the same for the process's CPU time. With more than one worker, or other work on the machine, jobs share the cores "
              "and their memory bandwidth: compare ratios within one run, not absolute times; CPU time is the "
              "least disturbed measure. Peak RSS includes a few hundred MB of imported libraries common to every job.", ""]
    L += ["## Settings and budgets", "",
          f"- Data: the benchmark data of `domix fetch data` (docs/guide.md, \"The benchmark data\"); deterministic subsets in "
          f"`{results['data']['key']}`: task train/dev/test = "
          + ", ".join(f"{t} {v['train']['examples']}/{v['dev']['examples']}/{v['test']['examples']}"
                      for t, v in results["data"]["tasks"].items()) + ".",
          f"- Pre-training, equal in tokens per domain: every module and every ncl stage sees {pre['steps']} steps × "
          f"{pre['batch_size']} × {pre['seq_len']} tokens = {tokens:,} tokens of its domain; **joint-lora gets the sum**, "
          f"{pre['steps'] * len(s['domains'])} steps = {tokens * len(s['domains']):,} tokens over the union in one run. "
          f"LoRA r={pre['rank']}, alpha={pre['alpha']}, all linear layers, lr {pre['lr']}, "
          f"{pre.get('dtype', 'fp32')}; ncl trains all weights "
          f"at lr {pre['full_lr']} (a LoRA lr would wreck a full model; not tuned). "
          + (f"Pre-training seed {pre['seed']}, but " + ", ".join(f"fine-tuning seed {k} on modules of pre-training seed {v}"
                                                             for k, v in alt.items()) + "."
             if (alt := {k: v for k, v in (s.get("module_seeds") or {}).items() if int(k) in results["seeds"]})
             else f"Pre-training runs once (seed {pre['seed']}); the seeds vary fine-tuning."),
          f"- Fine-tuning, equal in epochs: {ft['epochs']:g} epoch(s) of batch {ft['batch_size']}, max length "
          f"{ft['max_seq_len']} tokens, linear schedule with 10% warm-up, {ft.get('dtype', 'fp32')}, for every method"
          + (f"; dev scored every {ft['eval_every']} steps, the best dev step kept, stopped after {ft.get('patience')} "
             "evaluations without improvement" if ft.get("keep_best") else "") + ". "
          + (f"Learning rates: every method's standard ones ({ft['lr']} for LoRA/DoRA/DoMIX, bridge lr "
             f"{s['domix_defaults']['bridge_lr']}, {ft['full_lr']} for full fine-tuning) times the factor it chose on "
             f"dev among {', '.join(f'{f:g}' for f in s['lr_grid'])} (see Learning rates)."
             if s.get("lr_grid") else
             f"Learning rates are each family's standard value, not tuned: {ft['lr']} for LoRA/DoRA/DoMIX (bridge lr "
             f"{s['domix_defaults']['bridge_lr']}), {ft['full_lr']} for full fine-tuning (base-full, ncl)."),
          f"- base-lora/base-dora use rank {ft['base_lora_rank']}" + (
              ", the modules' rank, so own-lora vs base-lora (the DAP curve, C1) differ only in the starting point"
              if ft["base_lora_rank"] == pre["rank"] else f"; the modules have rank {pre['rank']}")
          + "; own-lora and joint-lora keep their module's rank"
          + (f"; base-lora-params and base-dora-params rank {s['capacity']['params']} and base-lora-rank rank "
             f"{s['capacity']['rank']}, DoMIX's capacity (see Capacity)" if s.get("capacity") else "")
          + ". Trainable parameters per method: see Efficiency.",
          f"- domix = FinetuneConfig defaults (bridge_init `{s['domix_defaults']['bridge_init']}`); the ablations set "
          "P = I/(N·r) (domix-rank), I/N (domix-uniform), I (domix-identity, trainable), the default init frozen "
          "(domix-frozen-bridge); cat-merge is P = I frozen. A variant whose settings equal domix's shares its runs.",
          *([f"- ncl orders: {'; '.join(orders)}; the ncl row of the task tables pools both orders."]
            if "ncl" in results["methods"] else []),
          *([_auto_note(results)] if "domix-auto-2" in results["methods"] else []),
          *([f"- Merge baselines ({', '.join(m for m in MERGES if m in results['methods'])}): the "
             f"{len(s['domains'])} modules of the first order's library ({orders[0]}) merged into one LoRA by PEFT's "
             f"`add_weighted_adapter` (`domix library merge`: linear, ties, dare_ties; weights 1/N each, density "
             f"{DEFAULT_DENSITY} for ties and dare_ties), "
             "then every task fine-tuned from the merged module as own-lora is from its domain's module (the same "
             "settings; the merged module keeps rank r, with PEFT's alpha = r)."]
            if any(m in MERGES for m in results["methods"]) else []),
          *([f"- MoDE (docs/design.md; {_mode_layout(results)}): each domain's expert sees the modules' "
             f"{tokens:,} tokens of its domain (expert lr {s['mode']['lr']:g}, gate lr "
             f"{s['mode'].get('gate_lr', 1e-3):g}"
             f"{', from the grid above' if s.get('mode_lr_choice') else ', set in the settings of the run'}); "
             "the composition adds "
             f"{s['mode']['compose_steps']} steps × {pre['batch_size']} × {pre['seq_len']} = "
             f"{s['mode']['compose_steps'] * pre['batch_size'] * pre['seq_len']:,} tokens of the four corpora in "
             "equal parts (DoMIX has no such stage: MoDE's pre-training budget is that much larger) at gate lr "
             f"{compose_gate_lr(s['mode']):g}, with `mode compose`'s routing loss, the gates reading "
             f"{'each token and the mean of the text so far' if s['mode'].get('gate_context') == 'mean' else 'each token'}"
             + (" (routed: a router picks the expert, each expert keeps its own gate)"
                if s['mode'].get('gate_form') == 'routed' else "") + ". "
             "mode trains experts and gates in composition and fine-tuning; mode-frozen-experts trains the gates "
             f"(and the head) only in both. MoDE fine-tunes at lr {ft.get('mode_lr')} (experts are full "
             "transformer layers; gates at the bridge lr), not tuned."]
            if any(m.startswith("mode") for m in results["methods"]) and "mode" in s else []),
          f"- Preset `{results['preset']}` is small by necessity (2 CPU cores): treat differences within one std, or "
          "of a few points on a few hundred test examples, as noise.", ""]
    write_markdown(out, L, plots)
    return table
