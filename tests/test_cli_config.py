"""`domix.cli_config`: command-line options made from config dataclasses (no model is loaded)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from domix.cli import build_parser, main
from domix.cli_config import add_options, given
from domix.training import option


@dataclass(kw_only=True)
class Base:
    lr: float = option(5e-4, "learning rate")
    epochs: float = option(1.0, "passes", group="budget")
    max_steps: int | None = option(None, "steps", group="budget")
    device: str = option("auto", "where", choices=("auto", "cpu"))
    resume: bool = option(False, "continue")
    progress: bool = option(True, "bars", cli=False)


@dataclass(kw_only=True)
class Cfg(Base):
    name: str = option(help="required name")
    data: list[str] = option(help="paths")
    tags: list[str] | None = option(None, "optional list")
    rank: int = option(8, "LoRA rank")
    max_tokens: int | None = option(None, "tokens", group="budget")
    ratio: float | None = option(None, "100% of it")
    plots: bool = option(True, "draw plots")
    extra: dict = option({}, "metadata", cli=False)


def parser(**kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t")
    add_options(p, Cfg, **kw)
    p.add_argument("--json", action="store_true")
    return p


def test_types_defaults_and_kwargs():
    a = parser().parse_args(["--name", "x", "--data", "a", "b", "--rank", "4", "--lr", "1e-3", "--resume",
                             "--ratio", "0.5", "--tags", "t"])
    assert (a.name, a.data, a.rank, a.lr, a.resume, a.ratio, a.tags) == ("x", ["a", "b"], 4, 1e-3, True, 0.5, ["t"])
    assert a.device == "auto" and a.resume is True and a.plots is True
    assert not hasattr(a, "progress") and not hasattr(a, "extra")  # cli=False
    cfg = Cfg(**given(a, Cfg))
    assert (cfg.name, cfg.data, cfg.rank, cfg.epochs, cfg.max_steps) == ("x", ["a", "b"], 4, 1.0, None)
    assert cfg.progress is True  # cli=False: the dataclass default
    assert Cfg(**given(parser().parse_args(["--name", "x", "--data", "a", "--no-plots"]), Cfg)).plots is False


def test_required_choices_and_exclusive_budget():
    with pytest.raises(SystemExit):
        parser().parse_args(["--data", "a"])  # --name is required
    with pytest.raises(SystemExit):
        parser().parse_args(["--name", "x", "--data", "a", "--device", "tpu"])
    with pytest.raises(SystemExit):
        parser().parse_args(["--name", "x", "--data", "a", "--epochs", "2", "--max-steps", "3"])
    a = parser(optional=("name", "data")).parse_args([])
    assert a.name is None and a.data is None
    a = parser(exclude=("rank",)).parse_args(["--name", "x", "--data", "a"])
    assert not hasattr(a, "rank")


def test_budget_given_replaces_the_others():
    a = parser().parse_args(["--name", "x", "--data", "a", "--max-steps", "3"])
    assert given(a, Cfg)["max_steps"] == 3 and given(a, Cfg)["epochs"] == 1.0
    a = parser(overrides=True, exclude=("name", "data")).parse_args(["--epochs", "2"])  # over a file's max_steps
    assert given(a, Cfg) == {"epochs": 2.0, "max_steps": None, "max_tokens": None}


def test_override_mode_gives_only_what_was_given():
    p = parser(overrides=True)
    a = p.parse_args(["--name", "x", "--data", "a", "--rank", "16"])
    assert given(a, Cfg) == {"name": "x", "data": ["a"], "rank": 16}
    assert given(p.parse_args(["--name", "x", "--data", "a", "--json"]), Cfg)["progress"] is False
    assert "(default: 8)" in p.format_help()  # the help still shows the dataclass default


def test_help_shows_the_dataclass_defaults():
    text = " ".join(parser().format_help().split())
    assert "LoRA rank (default: 8)" in text and "learning rate (default: 0.0005)" in text
    assert "where (default: auto)" in text and "100% of it" in text
    assert "--no-plots" in text and "draw plots (default: True)" in text
    assert "required name (default" not in text and "steps (default" not in text
    assert "[--epochs EPOCHS | --max-steps MAX_STEPS | --max-tokens MAX_TOKENS]" in text  # one group


COMMANDS = [("pretrain", "(default: 8)"), ("pretrain-all", "(default: 8)"), ("finetune", "(default: 32)"),
            ("mode pretrain", "(default: 0.001)"), ("mode compose", "(default: 0.0001)"), ("mode eval", "128"),
            ("eval-lm", "128"), ("bench dap", "(default: 8)"), ("bench finetune", "(default: 32)"),
            ("bench quality", "quick (the default"), ("fetch", "model"), ("library list", "dir"),
            ("evaluate", "--model"), ("predict", "--text"), ("export", "merged")]


@pytest.mark.parametrize("command,shown", COMMANDS)
def test_every_command_has_help(command, shown, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command.split(), "--help"])
    assert e.value.code == 0
    assert shown in " ".join(capsys.readouterr().out.split())


def test_bench_subcommands_have_their_own_options():
    ap = build_parser()
    a = ap.parse_args(["bench", "finetune", "--modules", "2", "--module-rank", "4", "--inference-reps", "3"])
    assert (a.modules, a.module_rank, a.inference_reps, a.out) == (2, 4, 3, "bench-out/finetune.json")
    a = ap.parse_args(["bench", "quality", "--executor", "ray", "--preset", "full"])
    assert (a.executor, a.preset, a.workers, a.out) == ("ray", "full", None, None)
    with pytest.raises(SystemExit):
        ap.parse_args(["bench", "dap", "--preset", "full"])  # a quality option


def test_options_the_cli_could_not_reach_before():
    ap = build_parser()
    a = ap.parse_args(["finetune", "--train", "t", "--eval", "e", "--out", "o", "--lora-alpha", "8",
                       "--init-module", "law", "--warmup", "0", "--weight-decay", "0.01"])
    assert (a.lora_alpha, a.init_module, a.warmup, a.weight_decay) == (8.0, "law", 0.0, 0.01)
    a = ap.parse_args(["pretrain", "--domain", "d", "--data", "x", "--library", "l", "--dropout", "0.1"])
    assert a.dropout == 0.1
    a = ap.parse_args(["pretrain-all", "--config", "c.yaml", "--library", "l", "--rank", "4"])
    assert (a.rank, a.base, a.lr) == (4, None, None)  # overrides of the config: only what is given


def test_an_error_from_another_library_says_where_it_was_raised(monkeypatch, capsys, tmp_path):
    """domix's own errors are one line; a ValueError raised inside another library keeps its origin (and
    DOMIX_TRACEBACK=1 gives the traceback), so that a bug is not mistaken for bad input."""
    import json

    import domix.data.commonsense as cs
    from domix.cli import main

    monkeypatch.setattr(cs, "build_commonsense", lambda *a, **k: json.loads("{not json"))
    assert main(["fetch", "data", "commonsense", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("domix: error: Expecting property name") and "raised in " in err and "json" in err
    monkeypatch.setenv("DOMIX_TRACEBACK", "1")
    with pytest.raises(json.JSONDecodeError):
        main(["fetch", "data", "commonsense", "--out", str(tmp_path / "d")])
    monkeypatch.delenv("DOMIX_TRACEBACK")

    # raised by domix itself: one line
    assert main(["bench", "quality", "--set", "nope=1", "--out", str(tmp_path / "q")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("domix: error: --set nope: preset quick has no setting 'nope'")
