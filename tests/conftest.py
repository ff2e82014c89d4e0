"""Fixtures: tiny randomly initialised encoder (BERT) and decoder (Llama) checkpoints with a
tokenizer trained in the fixture, and small domain corpora built from fixed sentences."""
from __future__ import annotations

import random

import pytest

WORDS = {
    "bio": "patients protein cells clinical trial dose tumour gene expression mice therapy cohort".split(),
    "law": "court contract plaintiff statute appeal judge liability clause tenant ruling verdict".split(),
    "food": "recipe butter oven flour garlic simmer sauce bake pepper dough salt onion".split(),
}


def make_corpus(domain: str, n_docs: int = 60, seed: int = 0) -> list[str]:
    """Repetitive, learnable documents: each domain has its own vocabulary and word order."""
    rng = random.Random(f"{domain}-{seed}")
    words = WORDS[domain]
    docs = []
    for _ in range(n_docs):
        start = rng.randrange(len(words))
        docs.append(" ".join(words[(start + i) % len(words)] for i in range(rng.randint(12, 30))))
    return docs


class Stop(RuntimeError):
    """A simulated interruption of a training run (see `interrupt_at`)."""


def interrupt_at(step: int):
    """A Trainer callback that raises `Stop` at the end of optimizer step `step`."""
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == step:
                raise Stop("simulated interruption")

    return Interrupt()


def _tokenizer(path, kind: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if kind == "bert" else ["<pad>", "<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.WordLevel(unk_token=specials[1]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    text = [d for dom in WORDS for d in make_corpus(dom, 20)] + ["the a of and to in is for positive negative"]
    tok.train_from_iterator(text, trainers.WordLevelTrainer(special_tokens=specials))
    if kind == "bert":
        from tokenizers import processors
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                       bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = _tokenizer(path, "llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> str:
    import torch
    from transformers import BertConfig, BertForMaskedLM

    path = tmp_path_factory.mktemp("tiny-bert")
    tok = _tokenizer(path, "bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                     num_attention_heads=4, max_position_embeddings=256, pad_token_id=tok.pad_token_id)
    BertForMaskedLM(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def corpora(tmp_path_factory) -> dict:
    """{domain: path of a .txt corpus, one document per line}."""
    root = tmp_path_factory.mktemp("corpora")
    out = {}
    for dom in WORDS:
        p = root / f"{dom}.txt"
        p.write_text("\n".join(make_corpus(dom)) + "\n")
        out[dom] = str(p)
    return out


def cli_error(capsys, argv) -> str:
    """Run the command line on `argv`, which must fail as a user error: exit 2 and one
    `domix: error:` line on stderr (returned)."""
    from domix.cli import main

    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    line = err.splitlines()[-1]
    assert line.startswith("domix: error:"), err
    return line
