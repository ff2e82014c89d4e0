"""DoMIX as a PEFT method (`domix.DomixConfig`): get_peft_model trains exactly the bridges' P and B (and
modules_to_save), save_pretrained / PeftModel.from_pretrained restore it bit for bit from the base alone,
merge_and_unload folds it, export_lora writes a LoRA that PEFT loads without domix, the Trainer takes it
with the bridge's own rate, and the same tensors and forward as `domix finetune --method domix`."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from domix import DomixConfig, LibraryError, export_lora, param_groups, pretrain

DOMS = ["bio", "law"]


@pytest.fixture(scope="module")
def lib(tiny_decoder, corpora, tmp_path_factory):
    """Two modules of ranks 4 and 2 (mixed ranks and scalings) on the tiny decoder."""
    lib = tmp_path_factory.mktemp("peft-lib")
    for dom, rank in zip(DOMS, (4, 2)):
        pretrain(domain=dom, data=[corpora[dom]], library=str(lib), base=tiny_decoder, rank=rank, alpha=3 * rank,
                 max_steps=4, batch_size=4, seq_len=16, lr=2e-2, progress=False, device="cpu", threads=1)
    return str(lib)


def _base(path, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _x():
    return torch.randint(3, 40, (2, 12), generator=torch.Generator().manual_seed(1))


def test_get_peft_model_trains_exactly_the_bridges(tiny_decoder, lib):
    from peft import get_peft_model

    model = get_peft_model(_base(tiny_decoder), DomixConfig(library=lib, task_type="CAUSAL_LM"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".domix_P.default", ".domix_B.default")) for n in trainable)
    cfg = model.peft_config["default"]
    assert cfg.modules == DOMS
    bridged = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "domix_A")}
    assert bridged == set(cfg.layout)  # every layer the modules adapt, and no other
    layer = next(m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "domix_A"))
    assert layer.domix_A["default"].shape[0] == 6 and not layer.domix_A["default"].requires_grad  # N·r = 4 + 2
    assert torch.equal(layer.domix_P["default"], torch.eye(6) / 2)  # uniform: I / N


def test_the_same_bridge_as_finetune_method_domix(tiny_decoder, lib):
    """The tuner and `domix finetune --method domix` build the same tensors and compute the same output."""
    from peft import get_peft_model

    from domix.bridge import apply_bridge
    from domix.library import Library
    from domix.models import fingerprint

    ours = _base(tiny_decoder)
    apply_bridge(ours, Library(lib).select("all"), "uniform", fingerprint(ours))
    peft_model = get_peft_model(_base(tiny_decoder), DomixConfig(library=lib))
    with torch.no_grad():
        assert torch.equal(ours(_x()).logits, peft_model(_x()).logits)


def test_save_load_merge_and_export_round_trip(tiny_decoder, lib, tmp_path):
    from peft import PeftModel, get_peft_model

    model = get_peft_model(_base(tiny_decoder), DomixConfig(library=lib, bridge_init="rank"))
    opt = torch.optim.AdamW(param_groups(model, lr=1e-2, bridge_lr=5e-2))
    model.train()
    loss = model(_x(), labels=_x()).loss
    loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        want = model(_x()).logits
    model.save_pretrained(tmp_path / "adapter")
    import json

    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "DOMIX" and "import domix" in saved["loading"]  # for a user without domix
    # the library is not needed to load: the adapter holds A, P and B
    loaded = PeftModel.from_pretrained(_base(tiny_decoder, seed=5), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(_x()).logits, want)
    report = export_lora(model, tmp_path / "lora")
    assert report["lora_rank"] == 6
    merged = loaded.merge_and_unload()
    assert not any("domix" in n for n, _ in merged.named_modules())
    with torch.no_grad():
        assert torch.allclose(merged(_x()).logits, want, atol=1e-5)
    # the exported LoRA loads with PEFT alone, in a process that never imports domix
    code = (f"import sys, torch; from transformers import AutoModelForCausalLM; from peft import PeftModel\n"
            f"m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({tiny_decoder!r}), {str(tmp_path / 'lora')!r})\n"
            f"x = torch.randint(3, 40, (2, 12), generator=torch.Generator().manual_seed(1))\n"
            f"torch.save(m.eval()(x).logits.detach(), {str(tmp_path / 'out.pt')!r})\n"
            f"assert 'domix' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert torch.allclose(torch.load(tmp_path / "out.pt"), want, atol=1e-5)


def test_param_groups_give_the_bridge_its_rate(tiny_decoder, lib):
    from peft import get_peft_model

    model = get_peft_model(_base(tiny_decoder), DomixConfig(library=lib))
    groups = param_groups(model, lr=1e-3, bridge_lr=3e-3, weight_decay=0.01)
    by_lr = {g["lr"]: g for g in groups}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(".domix_P." in names[id(p)] for p in by_lr[3e-3]["params"]) and by_lr[3e-3]["weight_decay"] == 0.0
    assert all(".domix_B." in names[id(p)] for p in by_lr[1e-3]["params"])
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_the_trainer_trains_it_with_a_classification_head(tiny_decoder, lib, tmp_path):
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_decoder, num_labels=2)
    model = get_peft_model(base, DomixConfig(library=lib, task_type="SEQ_CLS"))
    assert any(".modules_to_save." in n for n, p in model.named_parameters() if p.requires_grad)  # the head
    ids = _x().repeat(4, 1)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": [i % 2 for i in range(len(ids))]})
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(param_groups(model, lr=1e-2, bridge_lr=3e-2))
    args = TrainingArguments(str(tmp_path / "t"), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None)).train()
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert any(".domix_P." in n for n in changed) and any(".domix_B." in n for n in changed)


def test_bad_input_is_refused_by_name(tiny_decoder, lib, tmp_path):
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    with pytest.raises(ValueError, match="needs library="):
        DomixConfig()
    with pytest.raises(LibraryError):
        get_peft_model(_base(tiny_decoder), DomixConfig(library=lib, modules="bio,nope"))
    # an adapter built on another base is refused when it is loaded there
    model = get_peft_model(_base(tiny_decoder), DomixConfig(library=lib))
    model.save_pretrained(tmp_path / "a")
    cfg = LlamaConfig.from_pretrained(tiny_decoder)
    torch.manual_seed(9)
    other = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(LibraryError, match="another base model"):
        PeftModel.from_pretrained(other, tmp_path / "a")


def test_trl_sft_trainer_takes_the_config(tiny_decoder, lib, tmp_path):
    pytest.importorskip("trl", reason="TRL is the optional `trl` extra (not in `make test-min`)")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from conftest import make_corpus

    data = Dataset.from_dict({"text": make_corpus("bio", 16, seed=4)})
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=4, report_to=[],
                     save_strategy="no", use_cpu=True, max_length=32, disable_tqdm=True, learning_rate=1e-2)
    trainer = SFTTrainer(model=_base(tiny_decoder), args=args, train_dataset=data,
                         processing_class=AutoTokenizer.from_pretrained(tiny_decoder),
                         peft_config=DomixConfig(library=lib, task_type="CAUSAL_LM"))
    # the bridge's rate: an optimizer of the wrapped model's groups, set before train()
    trainer.optimizer = torch.optim.AdamW(param_groups(trainer.model, lr=1e-2, bridge_lr=3e-2))
    P = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".domix_P." in n}
    trainer.train()
    now = dict(trainer.model.named_parameters())
    assert P and any(not torch.equal(now[n], v) for n, v in P.items())
    assert {n for n, p in now.items() if p.requires_grad} == {n for n in now if ".domix_P." in n or ".domix_B." in n}


@pytest.mark.parametrize("order", ["import domix; import peft", "import peft; import domix",
                                   "import domix; from peft import PeftModel"])
def test_the_method_is_registered_whichever_is_imported_first(order):
    """`import domix` stays light (no PEFT); the DOMIX method is registered once PEFT is imported too."""
    code = (f"import sys\n{order.replace('; ', chr(10))}\n"
            "from peft.utils.peft_types import PeftType\n"
            "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as M\n"
            "assert M[PeftType.DOMIX].__name__ == 'DomixConfig'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    light = "import sys, domix; assert 'peft' not in sys.modules"
    subprocess.run([sys.executable, "-c", light], check=True)


def test_finetune_and_a_script_of_the_api_train_the_same_model(tiny_decoder, lib, tmp_path):
    """`domix finetune --method domix` and a user's script (get_peft_model + the Trainer + param_groups), on the
    same data and seed, end at the same bridges: the CLI runs the PEFT method, not a copy of it."""
    import json

    from peft import get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

    from domix.cli import main
    from domix.data.tasks import generate_dataset, pad_collator
    from domix.finetune import FinetuneConfig

    rows = [{"prompt": f"item {i}: which court?", "answer": ["judge", "jury"][i % 2]} for i in range(12)]
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps, d = 3, FinetuneConfig(train="", eval="", out="")
    assert main(["finetune", "--method", "domix", "--task", "generate", "--library", lib, "--base", tiny_decoder,
                 "--train", str(data), "--eval", str(data), "--out", str(tmp_path / "cli"), "--max-steps", str(steps),
                 "--batch-size", "4", "--save-steps", "0", "--threads", "1", "--device", "cpu", "--json"]) == 0
    cli = load_file(str(tmp_path / "cli" / "model.safetensors"))

    tok = AutoTokenizer.from_pretrained(tiny_decoder)
    set_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_decoder), DomixConfig(library=lib))
    args = TrainingArguments(str(tmp_path / "api"), max_steps=steps, per_device_train_batch_size=4, seed=0,
                             data_seed=0, lr_scheduler_type="linear", warmup_steps=int(d.warmup * steps),
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    opt = torch.optim.AdamW(param_groups(model, lr=d.lr, bridge_lr=d.bridge_lr, weight_decay=d.weight_decay))
    Trainer(model=model, args=args, train_dataset=generate_dataset(rows, tok, d.max_seq_len),
            data_collator=pad_collator(tok), optimizers=(opt, None)).train()

    api = {n.removeprefix("base_model.model."): p for n, p in model.named_parameters() if p.requires_grad}
    assert set(api) == {n for n in cli if ".domix_P." in n or ".domix_B." in n}
    assert any(".domix_P." in n and not torch.equal(p, torch.eye(len(p)) / 2) for n, p in api.items())  # it trained
    for name, p in api.items():
        torch.testing.assert_close(p.detach(), cli[name], rtol=0, atol=1e-6, msg=name)
