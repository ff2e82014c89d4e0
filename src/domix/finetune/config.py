"""Options of `domix finetune`: the task and training options every method shares, and one
options class per method (as PEFT has one config per tuner).

`FinetuneConfig` is flat — the command line, `finetune(**kwargs)` and a task model's saved
`settings` all see one set of names — and is made of the per-method classes. Which fields a
method reads is its own business (`domix.finetune.methods.METHODS[name].fields`); the
benchmark keys a run on exactly those.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..checkpoints import DEFAULT_BASE
from ..mode.layer import GATE_CONTEXT_HELP, GATE_CONTEXTS, GATE_FORM_HELP, GATE_FORMS
from ..training import TrainOptions, option

METHOD_NAMES = ("domix", "lora", "dora", "full", "mode")
TASKS = ("classify", "generate")


@dataclass(kw_only=True)
class DomixOptions:
    """`--method domix`: a bridge P between the chosen modules' frozen A's and their trained B's."""

    bridge_init: str = option("uniform", "initial bridge: uniform (I/N), rank (I/(N*r)), identity (I), own:DOMAIN "
                                         "(uniform: best dev macro-F1 in the quick benchmark, see docs/benchmarks.md)")
    bridge_lr: float = option(3e-3, "learning rate of the bridge P (weight decay 0)")
    freeze_bridge: bool = option(False, "keep P at its initial value (ablation)")


@dataclass(kw_only=True)
class LoraOptions:
    """`--method lora` / `dora`: a PEFT LoRA (DoRA) on every linear layer of the blocks."""

    lora_rank: int = option(32, "rank of --method lora/dora")
    lora_alpha: float | None = option(None, "LoRA alpha of --method lora/dora (default: 2 x rank)")
    init_module: str | None = option(None, "--method lora: start from this module of --library (A and B trained; "
                                           "its rank and alpha)")


@dataclass(kw_only=True)
class ModeOptions:
    """`--method mode`: MoDE experts (from --library or a composed model) with their gates and the head."""

    from_composed: str | None = option(None, "--method mode: start from a composed MoDE model")
    freeze_experts: bool = option(False, "--method mode: train gates and head only")
    gate_context: str = option("token", "--method mode with --library (fresh gates): " + GATE_CONTEXT_HELP,
                               choices=GATE_CONTEXTS)
    gate_form: str = option("softmax", "--method mode with --library (fresh gates): " + GATE_FORM_HELP,
                            choices=GATE_FORMS)
    gate_lr: float = option(3e-3, "--method mode: learning rate of the gates (weight decay 0)")


@dataclass(kw_only=True)
class FinetuneConfig(ModeOptions, LoraOptions, DomixOptions, TrainOptions):
    """Options of `domix finetune`."""

    train: str = option(help="JSONL: text,label[,text_pair] (classify) or prompt,answer (generate)")
    eval: str = option(help="JSONL of the same shape, evaluated during and after training")
    out: str = option(help="task model directory (written atomically)")
    library: str | None = option(None, "module library (for --method domix, mode, lora --init-module)")
    base: str = option(DEFAULT_BASE, "'smollm2-135m' (the offline default) or a Hugging Face model id / local path")
    modules: str = option("all", "'all', a comma list of the library's modules, or auto:K (domix: the K modules "
                                 "whose loss on the training text gains most over the base, see `library rank`)")
    method: str = option("domix", "domix (bridge over library modules); mode (MoDE experts of --library, or "
                                  "--from-composed); lora/dora/full: the baselines from the base",
                         choices=METHOD_NAMES)
    task: str = option("classify", "classify (text -> label) or generate (prompt -> answer)", choices=TASKS)
    lr: float = option(5e-4, "learning rate of the trained weights (B_cat, LoRA, experts, all weights) and the head")
    epochs: float = option(3.0, "passes over the training data", group="budget")
    batch_size: int = option(16, "examples per device and step")
    max_seq_len: int = option(128, "tokens per example (longer ones are cut)")
    eval_every: int = option(0, "steps between evaluations on --eval (0: four per run)")
    keep_best: bool = option(False, "keep the parameters of the best evaluation on --eval (macro-F1 for classify, "
                                    "loss for generate) instead of the last step's")
    patience: int | None = option(None, "stop after this many evaluations without improvement on --eval, keeping "
                                        "the best (implies --keep-best)")
    save_steps: int = option(100, "checkpoint every N steps (for --resume)")
    max_new_tokens: int = option(32, "generate tasks: the longest answer")
