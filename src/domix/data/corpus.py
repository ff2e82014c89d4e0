"""User corpora for domain pre-training: load documents, hold some out, tokenise and pack.

Accepted inputs: `.txt` (one document per line), `.jsonl`/`.json` (field `text` or
`text_field`), `.csv`, a directory of those, or a `datasets` dataset saved to disk.
Tokenising and packing run through `datasets` and are cached under `$DOMIX_CACHE/datasets`.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from ..fetch import cache_dir

_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv"}
HELDOUT_FRACTION = 0.05
HELDOUT_SEED = 1234  # the held-out documents are a property of the corpus, not of a run


class CorpusError(ValueError):
    """A corpus path is missing, of an unknown type, empty, or lacks the text field."""


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS and p.is_file())
        if not files:
            raise CorpusError(f"directory {path} holds no .txt/.jsonl/.json/.csv files")
        return files
    if not path.exists():
        raise CorpusError(f"corpus {path} does not exist")
    if path.suffix not in _BUILDERS:
        raise CorpusError(f"corpus {path}: unknown file type '{path.suffix}' "
                          f"(use .txt, .jsonl, .json, .csv, a directory, or a saved dataset)")
    return [path]


def load_documents(paths, text_field: str = "text"):
    """A `datasets.Dataset` with one column `text`, one row per non-empty document."""
    import datasets

    parts = []
    for p in map(Path, [paths] if isinstance(paths, (str, Path)) else paths):
        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists()):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"]
            parts.append(_text_only(ds, text_field, p))
            continue
        for f in _files(p):
            if f.stat().st_size == 0:
                raise CorpusError(f"corpus file {f} is empty")
            try:
                ds = datasets.load_dataset(_BUILDERS[f.suffix], data_files=str(f), split="train",
                                           cache_dir=str(cache_dir() / "datasets"))
            except Exception as e:  # datasets wraps the reader's error: name the file and the cause
                bad = _unicode_error(e)
                if bad is None:
                    raise
                raise CorpusError(f"corpus file {f} is not UTF-8 text ({bad.reason} at byte {bad.start} of a "
                                  "chunk); convert it, e.g. iconv -f latin1 -t utf-8") from None
            parts.append(_text_only(ds, text_field, f))
    if not parts:
        raise CorpusError("no corpus given")
    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    ds = ds.filter(lambda b: [bool(t and t.strip()) for t in b["text"]], batched=True)
    if len(ds) == 0:
        raise CorpusError(f"corpus {', '.join(map(str, paths if not isinstance(paths, (str, Path)) else [paths]))} "
                          f"has no non-empty documents")
    return ds


def _unicode_error(e: BaseException) -> UnicodeDecodeError | None:
    """The UnicodeDecodeError behind `e` (datasets re-raises it wrapped), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, UnicodeDecodeError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _text_only(ds, text_field: str, where: Path):
    if text_field not in ds.column_names:
        raise CorpusError(f"{where}: no '{text_field}' field (fields: {ds.column_names}); "
                          f"choose one with --text-field")
    ds = ds.select_columns([text_field])
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


def split_heldout(docs, fraction: float = HELDOUT_FRACTION):
    """(train, held-out) split by document; held-out is empty for a one-document corpus."""
    if len(docs) < 2:
        return docs, docs.select([])
    n_held = max(1, round(len(docs) * fraction))
    split = docs.train_test_split(test_size=n_held, seed=HELDOUT_SEED, shuffle=True)
    return split["train"], split["test"]


class Corpus(NamedTuple):
    """A domain's corpus as stage 1 trains on it (`prepare_corpus`)."""

    train: object  # datasets.Dataset of seq_len blocks
    heldout: object | None  # the held-out blocks, or None (nothing to score)
    documents: int
    heldout_documents: int


def prepare_corpus(cfg, tokenizer, data=None) -> Corpus:
    """`data` (default `cfg.data`; read by `cfg.text_field`) split by document into training and
    held-out text, each packed into `cfg.seq_len` blocks, at most `cfg.eval_blocks` held out: what
    stage 1 (`pretrain`, `pretrain-all --fused`) and MoDE (`mode pretrain`, `mode compose`) train and
    score a corpus on."""
    train_docs, held_docs = split_heldout(load_documents(cfg.data if data is None else data, cfg.text_field))
    return Corpus(pack(train_docs, tokenizer, cfg.seq_len),
                  pack_heldout(held_docs, tokenizer, cfg.seq_len, max_blocks=cfg.eval_blocks),
                  len(train_docs), len(held_docs))


def pack_heldout(docs, tokenizer, seq_len: int, max_blocks: int | None = None):
    """The held-out blocks of `split_heldout`'s documents, or None when they do not fill one block
    (a small corpus): then nothing is scored."""
    blocks = pack(docs, tokenizer, seq_len, max_blocks, allow_empty=True) if len(docs) else None
    return blocks if blocks is not None and len(blocks) else None


def pack(docs, tokenizer, seq_len: int, max_blocks: int | None = None, allow_empty: bool = False):
    """Tokenise each document, end it with EOS/SEP, concatenate and cut into `seq_len` blocks
    (none, if `allow_empty`, when the text is shorter than one block; else CorpusError)."""
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=tokenizer.cls_token_id is not None)["input_ids"]
        return {"ids": [x + [end] if (end is not None and (not x or x[-1] != end)) else x for x in ids]}

    def group(batch):
        flat = [t for x in batch["ids"] for t in x]
        n = len(flat) // seq_len * seq_len
        return {"input_ids": [flat[i:i + seq_len] for i in range(0, n, seq_len)]}

    toks = docs.map(tokenize, batched=True, remove_columns=docs.column_names, desc="tokenise")
    blocks = toks.map(group, batched=True, batch_size=1000, remove_columns=["ids"], desc=f"pack {seq_len}")
    if len(blocks) == 0 and not allow_empty:
        raise CorpusError(f"corpus is shorter than one block of {seq_len} tokens; lower --seq-len")
    if max_blocks is not None and len(blocks) > max_blocks:
        blocks = blocks.select(range(max_blocks))
    return blocks
