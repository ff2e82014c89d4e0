"""Which of a library's modules a task needs, before any training: `domix library rank` and
`domix finetune --modules auto:K`.

Each LoRA module is scored on the task's own text by the mean token loss of the base with that
module attached (next-token loss for decoders; for encoders masked-LM loss with the seeded,
fixed masking of `eval-lm`, so every module is scored on the same positions), against the base
alone. A module whose domain the task's text resembles lowers that loss most: its gain
(base loss − module loss, nats/token) ranks it. The base is loaded once; the modules are PEFT
adapters switched on it in turn.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..options import DEVICES, option
from .store import Library, LibraryError, one_base


@dataclass(kw_only=True)
class RankOptions:
    """Options of `domix library rank`."""

    library: str = option(help="library directory")
    data: str = option(help="the task's JSONL (its 'text', or 'prompt' and 'answer', is scored)")
    base: str | None = option(None, "default: the base the modules were trained on")
    modules: str = option("all", "'all' (every LoRA module) or a comma list")
    plot: str | None = option(None, "also write a bar plot PNG of the gains here")
    seq_len: int = option(128, "tokens per scored block")
    batch_size: int = option(8, "blocks per forward pass")
    max_blocks: int = option(32, "blocks of the task's text scored")
    device: str = option("auto", "where to score", choices=DEVICES)

AUTO = re.compile(r"^auto:(\d+)$")


def parse_auto(modules) -> int | None:
    """K of an `auto:K` module choice; None for 'all' or a list of names."""
    if not isinstance(modules, str) or not modules.startswith("auto"):
        return None
    m = AUTO.match(modules.strip())
    if not m or int(m[1]) < 1:
        raise ValueError(f"--modules {modules!r}: write auto:K with K >= 1 (e.g. auto:2)")
    return int(m[1])


def task_texts(path: str | Path) -> list[str]:
    """The text of a task file's rows: `text` (classification) or `prompt` + `answer` (generation)."""
    from ..data.tasks import TaskDataError, read_jsonl

    rows = read_jsonl(path, ())
    texts = [r["text"] if "text" in r else f"{r.get('prompt', '')} {r.get('answer', '')}".strip() for r in rows]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise TaskDataError(f"{path}: no text to score (rows need 'text', or 'prompt' and 'answer')")
    return texts


def rank_modules(library: str | Path, data: str | Path, base: str | None = RankOptions.base,
                 modules=RankOptions.modules, seq_len: int = RankOptions.seq_len,
                 batch_size: int = RankOptions.batch_size, max_blocks: int | None = RankOptions.max_blocks,
                 device: str = RankOptions.device, progress: bool = False) -> dict:
    """Score every LoRA module of `library` (or `modules`) on the text of the task file `data`.

    Returns {"base", "objective", "data", "base_loss", "tokens", "ranking": [{"name", "loss",
    "gain"}, ...]} with the ranking from the most to the least relevant module (largest gain
    first; ties by name). Modules trained on different bases are refused, named."""
    import datasets
    from peft import PeftModel

    from ..data.corpus import pack
    from ..lm import lm_loss
    from ..models import fingerprint, load_model, load_tokenizer, select_device

    lib = Library(library)
    mods = lib.select(modules, kind="lora")
    one_base(mods)
    base = base or mods[0].meta["base"]
    model, objective = load_model(base, head="lm")
    fp = fingerprint(model)
    for m in mods:
        m.check_base(fp)
        m.tensors()  # a truncated file fails here, with the module's name
    tokenizer = load_tokenizer(base)
    docs = datasets.Dataset.from_dict({"text": task_texts(data)})
    blocks = pack(docs, tokenizer, seq_len, max_blocks=max_blocks, allow_empty=True)
    while len(blocks) == 0 and seq_len > 16:  # a short task: shorter blocks rather than none
        seq_len //= 2
        blocks = pack(docs, tokenizer, seq_len, max_blocks=max_blocks, allow_empty=seq_len > 16)
    model.to(select_device(device))
    base_score = lm_loss(model, blocks, tokenizer, objective, batch_size, seed=0)
    peft, ranking = None, []
    for prev, m in zip([None, *mods], mods):
        if peft is None:
            peft = PeftModel.from_pretrained(model, str(m.path), adapter_name=m.name)
        else:  # one adapter held at a time
            peft.load_adapter(str(m.path), adapter_name=m.name)
            peft.set_adapter(m.name)
            peft.delete_adapter(prev.name)
        loss = lm_loss(peft, blocks, tokenizer, objective, batch_size, seed=0, progress=progress)["loss"]
        ranking.append({"name": m.name, "domain": m.meta.get("domain"), "loss": round(loss, 5),
                        "gain": round(base_score["loss"] - loss, 5)})
    ranking.sort(key=lambda r: (-r["gain"], r["name"]))
    return {"base": base, "objective": objective, "data": str(data), "base_loss": round(base_score["loss"], 5),
            "tokens": base_score["tokens"], "seq_len": seq_len, "ranking": ranking}


def choose_modules(library: str | Path, data: str | Path, k: int, base: str | None = None, **kw) -> dict:
    """The K most relevant modules for the task file `data` (`rank_modules`), as `finetune` records them."""
    n = len(Library(library).list("lora"))
    if k > n:
        raise LibraryError(f"--modules auto:{k} asks for {k} modules, but library {library} has {n} LoRA "
                           f"module{'s' if n != 1 else ''}")
    ranked = rank_modules(library, data, base=base, **kw)
    return {**ranked, "k": k, "chosen": [r["name"] for r in ranked["ranking"][:k]]}


def plot_ranking(result: dict, path: str | Path) -> Path:
    """A horizontal bar chart of the modules' gains (nats/token), the most relevant on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import save_figure

    rows = result["ranking"]
    chosen = set(result.get("chosen", []))
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(rows) + 1.2))
    ax.barh([r["name"] for r in rows][::-1], [r["gain"] for r in rows][::-1],
            color=["tab:blue" if r["name"] in chosen else "tab:gray" for r in rows][::-1])
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("loss gain over the base on the task's text (nats/token)")
    data = Path(result["data"])
    ax.set_title(f"module relevance: {data.parent.name}/{data.name}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
