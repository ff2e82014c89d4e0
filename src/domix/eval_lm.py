"""`domix eval-lm`: the LM loss of the base alone or with one library entry on a corpus. A command
over the library and MoDE, kept out of `lm.py`, which holds the objectives only."""
from __future__ import annotations


def eval_lm(base: str, data, library: str | None = None, module: str | None = None, seq_len: int = 128,
            batch_size: int = 8, max_blocks: int | None = 64, objective: str = "auto", device: str = "auto",
            text_field: str = "text", seed: int = 0, progress: bool = True) -> dict:
    """Mean token loss and perplexity of the base alone or with one library entry on a corpus: a
    LoRA module, a `full` entry or a MoDE expert (with its own gate)."""
    from .data.corpus import load_documents, pack
    from .library import Library
    from .library.loading import load_with_module
    from .lm import lm_loss
    from .models import load_model, load_tokenizer, select_device

    if module:
        if not library:
            raise ValueError("--module needs --library")
        mod = Library(library).get(module, kinds=("lora", "full", "mode-expert"))
        if mod.kind == "mode-expert":
            from .mode.train import eval_mode

            return {"module": module, **eval_mode(mod.path, data, seq_len=seq_len, batch_size=batch_size,
                                                   max_blocks=max_blocks, device=device, text_field=text_field,
                                                   seed=seed, base=base, progress=progress)}
    tokenizer = load_tokenizer(base)
    if module:
        model, objective = load_with_module(base, library, module, objective)
    else:
        model, objective = load_model(base, head="lm", objective=objective)
    model.to(select_device(device))
    blocks = pack(load_documents(data, text_field), tokenizer, seq_len, max_blocks=max_blocks)
    out = lm_loss(model, blocks, tokenizer, objective, batch_size, seed=seed, progress=progress)
    return {"base": base, "module": module, "objective": objective, **out}
