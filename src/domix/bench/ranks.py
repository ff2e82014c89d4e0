"""`domix bench ranks`: how small a DoMIX task model can be exported.

A DoMIX task model's update in each bridged layer is one LoRA of rank N·r (`domix export`);
`export --rank K` truncates it per layer by SVD. This scores the task model as each K would
export it — macro-F1, accuracy and cross-entropy on a labelled file — next to the untruncated
model, with the adapter's size and the updates' relative truncation error, so a user sees
the quality a smaller adapter costs. Results as JSON, and a plot beside it.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..training import DEVICES, option


@dataclass(kw_only=True)
class RanksOptions:
    """Options of `domix bench ranks`."""

    model: str = option(help="a DoMIX task model directory (`domix finetune --method domix`, a classify task)")
    data: str = option(help="labelled JSONL to score every rank on (the task's dev or test split)")
    ranks: str = option("0,1,2,4,8,16", "comma list of ranks K (each layer's update truncated to K by SVD; 0: "
                                        "no update, the base with the trained head alone)")
    batch_size: int = option(32, "examples per forward pass")
    device: str = option("auto", "where to score", choices=DEVICES)
    out: str | None = option("bench-out/ranks.json", "where to write the JSON result (the plot: same name, .png)")


def _ranks(text: str) -> list[int]:
    try:
        ranks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--ranks must be a comma list of integers >= 0, not {text!r}") from None
    if not ranks or ranks[0] < 0:
        raise ValueError(f"--ranks must be a comma list of integers >= 0, not {text!r}")
    return ranks


def _score(model, tokenizer, spec: dict, rows: list[dict], batch_size: int) -> dict:
    """macro-F1, accuracy and the mean cross-entropy of the gold labels."""
    import torch

    from ..data.tasks import encode_labels
    from ..finetune.evaluate import classification_metrics, predict_classify

    y = encode_labels(rows, spec["labels"], "the --data file")
    probs = predict_classify(model, tokenizer, [r["text"] for r in rows],
                             [r["text_pair"] for r in rows] if any("text_pair" in r for r in rows) else None,
                             batch_size, spec["max_seq_len"])
    m = classification_metrics(y, probs.argmax(-1).tolist(), spec["labels"])
    loss = -torch.log(probs[torch.arange(len(y)), torch.tensor(y)].clamp_min(1e-12)).mean().item()
    return {"macro_f1": m["macro_f1"], "accuracy": m["accuracy"], "loss": loss}


def run(opts: RanksOptions) -> dict:
    from tqdm.auto import tqdm

    from ..bridge.apply import bridged_layers
    from ..data.tasks import read_jsonl
    from ..export import truncated
    from ..finetune import load_task_model
    from ..io import write_json

    ranks = _ranks(opts.ranks)
    model, tokenizer, spec = load_task_model(opts.model, device=opts.device)
    if spec["method"] != "domix" or spec["task"] != "classify":
        raise ValueError(f"bench ranks takes a DoMIX classify task model; {opts.model} is a {spec['method']} "
                         f"{spec['task']} model")
    layers = bridged_layers(model)
    full = max(layer.bridge()[0].shape[0] for layer in layers.values())  # N·r
    rows = read_jsonl(opts.data, ("text", "label"))
    if not rows:
        raise ValueError(f"{opts.data} has no examples")

    def size(k: int) -> int:  # LoRA parameters of the export at rank k (A: k x in, B: out x k per layer)
        return sum(min(k, layer.bridge()[0].shape[0]) * (layer.in_features + layer.out_features)
                   for layer in layers.values())

    points = []
    for k in tqdm([*(k for k in ranks if k < full), None], desc="ranks", disable=opts.out is None):
        with truncated(model, k) as errors:
            scores = _score(model, tokenizer, spec, rows, opts.batch_size)
        rank = full if k is None else k
        points.append({"rank": rank, "truncated": k is not None, "lora_params": size(rank),
                       "max_relative_error": max(errors.values()) if errors else 0.0,
                       "mean_relative_error": sum(errors.values()) / len(errors) if errors else 0.0, **scores})
    out = {"benchmark": "ranks", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "model": str(opts.model), "data": str(opts.data), "examples": len(rows), "base": spec["base"],
           "labels": spec["labels"], "full_rank": full, "layers": len(layers), "points": points}
    out["table"] = table(out)
    if opts.out:
        write_json(Path(opts.out), out)
        plot(out, Path(opts.out).with_suffix(".png"))
    return out


def table(res: dict) -> str:
    lines = [f"{res['model']} on {res['data']} ({res['examples']} examples), each layer's update truncated to rank K",
             "| K | LoRA params | max rel. error | macro-F1 | accuracy | loss |", "|---:|---:|---:|---:|---:|---:|"]
    for p in res["points"]:
        k = f"{p['rank']}" + ("" if p["truncated"] else " (untruncated)")
        lines.append(f"| {k} | {p['lora_params']:,} | {p['max_relative_error']:.3f} | {p['macro_f1']:.4f} | "
                     f"{p['accuracy']:.4f} | {p['loss']:.4f} |")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    """macro-F1 and loss against the rank K (log scale), the untruncated model as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import save_figure

    pts = res["points"]
    ks = [p["rank"] for p in pts]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(ks, [p["macro_f1"] for p in pts], "o-", color="tab:blue", label="macro-F1")
    ax.axhline(pts[-1]["macro_f1"], ls="--", color="tab:blue", lw=0.8)
    ax.set_xscale("symlog", base=2, linthresh=1)  # K = 0 (no update) on the same axis
    ax.set_xlabel("export rank K (untruncated: N·r = %d)" % res["full_rank"])
    ax.set_ylabel("macro-F1", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(ks, [p["loss"] for p in pts], "s-", color="tab:red", label="loss")
    ax2.axhline(pts[-1]["loss"], ls="--", color="tab:red", lw=0.8)
    ax2.set_ylabel("cross-entropy", color="tab:red")
    ax.set_xticks(ks, [str(k) for k in ks])
    model, data = Path(res["model"]), Path(res["data"])
    ax.set_title(f"{model.parent.name}/{model.name} on {data.parent.name}/{data.name}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
