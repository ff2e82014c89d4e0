"""Module selection before training: `library rank` scores each module on a task's own text;
`finetune --modules auto:K` bridges the K best and records the choice."""
from __future__ import annotations

import json
import shutil

import pytest
from conftest import make_corpus
from test_bench_quality import TINY, data_root  # noqa: F401  (data_root: a fixture)

from domix import LibraryError, pretrain
from domix.cli import main
from domix.finetune import finetune
from domix.library.select import parse_auto, rank_modules

DOMS = ["bio", "law", "food"]


@pytest.fixture(scope="module")
def libs(tiny_decoder, tiny_encoder, corpora, tmp_path_factory):
    """{base: a library with modules bio, law, food}, trained hard enough to know their domain."""
    out = {}
    for base in (tiny_decoder, tiny_encoder):
        lib = tmp_path_factory.mktemp("rank-lib")
        for dom in DOMS:
            pretrain(domain=dom, data=[corpora[dom]], library=str(lib), base=base, rank=4, alpha=8, max_steps=10,
                     batch_size=4, seq_len=16, lr=2e-2, progress=False, device="cpu", threads=1)
        out[base] = lib
    return out


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """{domain: a classification task file whose texts are of that domain} (labels are arbitrary)."""
    root = tmp_path_factory.mktemp("rank-tasks")
    out = {}
    for dom in DOMS:
        rows = [{"text": t, "label": "ab"[i % 2]} for i, t in enumerate(make_corpus(dom, 40, seed=5))]
        out[dom] = root / f"{dom}.jsonl"
        out[dom].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.mark.parametrize("kind", ["tiny_decoder", "tiny_encoder"])
def test_a_task_ranks_its_own_domain_first(kind, request, libs, tasks):
    base = request.getfixturevalue(kind)
    for dom in DOMS:
        res = rank_modules(libs[base], tasks[dom], seq_len=32, device="cpu")
        assert [r["name"] for r in res["ranking"]][0] == dom, (dom, res["ranking"])
        assert res["objective"] == ("clm" if kind == "tiny_decoder" else "mlm")
        for r in res["ranking"]:
            assert r["gain"] == pytest.approx(res["base_loss"] - r["loss"], abs=1e-4)
        gains = [r["gain"] for r in res["ranking"]]
        assert gains == sorted(gains, reverse=True) and gains[0] > 0
    # scoring is deterministic (the masked-LM positions are seeded)
    again = rank_modules(libs[base], tasks["food"], seq_len=32, device="cpu")
    assert again == rank_modules(libs[base], tasks["food"], seq_len=32, device="cpu")


def test_rank_cli_and_auto_k_finetune(tiny_decoder, libs, tasks, tmp_path, capsys):
    lib = libs[tiny_decoder]
    assert main(["library", "rank", "--library", str(lib), "--data", str(tasks["law"]), "--plot",
                 str(tmp_path / "rank.png"), "--device", "cpu", "--json"]) == 0
    ranked = json.loads(capsys.readouterr().out)
    order = [r["name"] for r in ranked["ranking"]]
    assert order[0] == "law" and sorted(order) == sorted(DOMS)
    assert (tmp_path / "rank.png").stat().st_size > 0
    assert main(["library", "rank", "--library", str(lib), "--data", str(tasks["law"]), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert text.index(" law ") < text.index(" bio ") and "base loss" in text

    # auto:K bridges the K best on the training text, and says so in task.json and metrics.json
    out = tmp_path / "auto"
    m = finetune(method="domix", library=str(lib), modules="auto:2", base=tiny_decoder, train=str(tasks["law"]),
                 eval=str(tasks["law"]), out=str(out), epochs=1, batch_size=8, progress=False, device="cpu", threads=1)
    assert m["module_selection"]["chosen"] == order[:2] and m["module_selection"]["k"] == 2
    spec = json.loads((out / "task.json").read_text())
    assert [x["name"] for x in spec["modules"]] == order[:2]
    assert spec["module_selection"]["ranking"] == ranked["ranking"]
    assert spec["settings"]["modules"] == "auto:2"
    # the finished model is kept by the same command with --resume, not retrained
    again = finetune(method="domix", library=str(lib), modules="auto:2", base=tiny_decoder, train=str(tasks["law"]),
                     eval=str(tasks["law"]), out=str(out), epochs=1, batch_size=8, progress=False, device="cpu",
                     threads=1, resume=True)
    assert again["train_time_s"] == m["train_time_s"]


def test_bad_module_choices_are_refused(tiny_decoder, libs, tasks, tmp_path, capsys):
    lib = libs[tiny_decoder]
    base_args = ["finetune", "--base", tiny_decoder, "--library", str(lib), "--train", str(tasks["bio"]), "--eval",
                 str(tasks["bio"]), "--device", "cpu"]
    assert main([*base_args, "--modules", "auto:4", "--out", str(tmp_path / "a")]) == 2
    assert "asks for 4 modules, but library" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main([*base_args, "--modules", "auto:0", "--out", str(tmp_path / "b")]) == 2
    assert "auto:K with K >= 1" in capsys.readouterr().err
    assert parse_auto("all") is None and parse_auto("bio,law") is None and parse_auto("auto:3") == 3
    # modules of different bases in one library: refused, each named
    mixed = tmp_path / "mixed"
    shutil.copytree(lib / "bio", mixed / "bio")
    shutil.copytree(libs[next(b for b in libs if b != tiny_decoder)] / "law", mixed / "law")
    with pytest.raises(LibraryError, match=r"different bases: bio \(fingerprint .*; law \(fingerprint"):
        rank_modules(mixed, tasks["bio"], device="cpu")


def test_bench_quality_runs_domix_auto_2(tiny_decoder, data_root, tmp_path):  # noqa: F811
    """`bench quality --methods domix-auto-2`: each task bridges the 2 modules ranked best on its
    training text; the runs and the report say which."""
    from domix.bench.quality import run_quality

    res = run_quality("quick", out=tmp_path / "out", base=tiny_decoder, data_root=data_root, workers=2, progress=False,
                      methods=["domix-auto-2"], overrides={**TINY, "domains": ["bio", "reviews", "news"]})
    assert not res["failures"], res["failures"]
    runs = [r for r in res["runs"] if r["method"] == "domix-auto-2"]
    assert len(runs) == 3
    for r in runs:
        assert len(r["modules_chosen"]) == 2 and set(r["modules_chosen"]) <= {"bio", "reviews", "news"}
    assert "domix-auto-2 bridges the 2 modules" in (tmp_path / "out" / "REPORT.md").read_text()
