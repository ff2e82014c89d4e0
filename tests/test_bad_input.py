"""Bad input gets one clear line naming what is wrong (and, where it helps, what would be right),
and loses nothing: each case through the command line, as a user meets it."""
from __future__ import annotations

import json

import pytest
from conftest import cli_error, make_corpus

from domix import pretrain
from domix.cli import main


@pytest.fixture(scope="module")
def lib(tiny_decoder, corpora, tmp_path_factory):
    path = tmp_path_factory.mktemp("lib")
    for dom in ("bio", "law"):
        pretrain(domain=dom, data=[corpora[dom]], library=str(path), base=tiny_decoder, rank=4, alpha=8,
                 max_steps=2, batch_size=4, seq_len=16, progress=False, device="cpu", threads=1)
    return path


def _rows(n=12, label=lambda i: ["bio", "law"][i % 2]):
    return [{"text": t, "label": label(i)} for i, t in enumerate(make_corpus("bio", n, seed=5))]


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _finetune(tmp_path, tiny_decoder, lib, train, dev, *extra):
    return ["finetune", "--train", train, "--eval", dev, "--out", str(tmp_path / "task"), "--library", str(lib),
            "--base", tiny_decoder, "--epochs", "1", "--device", "cpu", *extra]


@pytest.mark.parametrize("case, message", [
    ("not-json", r"train.jsonl:3: not valid JSON"),
    ("no-label", r"train.jsonl:1: missing field\(s\) \['label'\]"),
    ("empty", r"train.jsonl has no examples"),
    ("latin1", r"train.jsonl is not UTF-8 text"),
    ("not-object", r"train.jsonl:2: not a JSON object"),
    ("unknown-eval-label", r"label\(s\) \['neg'\] are not known to the model \(known: \['0', '1'\]\)"),
])
def test_bad_task_files(case, message, tiny_decoder, lib, tmp_path, capsys):
    rows = _rows()
    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    if case == "not-json":
        _jsonl(train, rows[:2] + ['{"text": "cut off'] + rows[3:])
    elif case == "no-label":
        _jsonl(train, [{"text": "no label here"}] + rows)
    elif case == "empty":
        train.write_text("\n")
    elif case == "not-object":
        _jsonl(train, rows[:1] + ["5"] + rows[1:])
    elif case == "latin1":
        train.write_bytes(json.dumps({"text": "café", "label": "bio"}, ensure_ascii=False).encode("latin1") + b"\n")
    else:  # integer labels in train, strings in eval: "0"/"1" are the same labels, "neg" is not
        rows = _rows(label=lambda i: i % 2)
        _jsonl(train, rows)
        _jsonl(dev, [{**r, "label": str(r["label"])} for r in rows[:4]] + [{"text": "x y", "label": "neg"}])
    if not dev.exists():
        _jsonl(dev, rows[:4])
    line = cli_error(capsys, _finetune(tmp_path, tiny_decoder, lib, str(train), str(dev)))
    assert __import__("re").search(message, line), line
    assert not (tmp_path / "task").exists()


def test_integer_train_labels_and_string_eval_labels_are_the_same_labels(tiny_decoder, lib, tmp_path, capsys):
    rows = _rows(label=lambda i: i % 2)
    train = _jsonl(tmp_path / "train.jsonl", rows)
    dev = _jsonl(tmp_path / "dev.jsonl", [{**r, "label": str(r["label"])} for r in rows[:6]])
    assert main(_finetune(tmp_path, tiny_decoder, lib, train, dev, "--json")) == 0
    assert json.loads((tmp_path / "task" / "task.json").read_text())["labels"] == ["0", "1"]


def test_unknown_modules_and_bridge_init_name_the_known_ones(tiny_decoder, lib, tmp_path, capsys):
    train = _jsonl(tmp_path / "train.jsonl", _rows())
    line = cli_error(capsys, _finetune(tmp_path, tiny_decoder, lib, train, train, "--modules", "bio,chem"))
    assert "no module 'chem'" in line and "bio, law" in line
    line = cli_error(capsys, _finetune(tmp_path, tiny_decoder, lib, train, train, "--bridge-init", "own:chem"))
    assert "own:chem" in line and "bio" in line and "law" in line


def test_another_methods_options_are_refused_by_name(tiny_decoder, lib, tmp_path, capsys):
    """An option the chosen method would ignore is refused, naming it and the method it belongs to."""
    train = _jsonl(tmp_path / "train.jsonl", _rows())
    line = cli_error(capsys, _finetune(tmp_path, tiny_decoder, lib, train, train, "--lora-rank", "16"))
    assert "--lora-rank (--method lora/dora) does not apply to --method domix" in line
    line = cli_error(capsys, _finetune(tmp_path, tiny_decoder, lib, train, train, "--method", "lora",
                                       "--bridge-lr", "1e-2", "--gate-lr", "1e-2"))
    assert "--bridge-lr (--method domix), --gate-lr (--method mode) do not apply to --method lora" in line
    line = cli_error(capsys, _finetune(tmp_path, tiny_decoder, lib, train, train, "--method", "full"))
    assert "--library (--method domix/lora/mode) does not apply to --method full" in line
    assert not (tmp_path / "task").exists()


def test_mode_gates_train_at_their_own_rate():
    """MoDE's gates take --gate-lr, DoMIX's bridge --bridge-lr: two options, not one doing double duty."""
    from domix.finetune import METHODS, FinetuneConfig

    cfg = FinetuneConfig(train="t", eval="e", out="o", bridge_lr=1e-2, gate_lr=2e-2)
    assert METHODS["mode"].mixing_lr(cfg) == 2e-2 and METHODS["domix"].mixing_lr(cfg) == 1e-2
    assert "gate_lr" in METHODS["mode"].fields and "bridge_lr" not in METHODS["mode"].fields


def test_a_corpus_with_invalid_utf8_is_named(tiny_decoder, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("good text here\n".encode() * 20 + b"broken \xff\xfe bytes\n")
    line = cli_error(capsys, ["pretrain", "--domain", "bad", "--data", str(bad), "--library", str(tmp_path / "lib"),
                           "--base", tiny_decoder, "--max-steps", "1", "--device", "cpu"])
    assert "bad.txt" in line and "UTF-8" in line
    assert not (tmp_path / "lib" / "bad").exists()


def test_a_stale_staging_directory_is_ignored(tiny_decoder, lib, tmp_path, capsys):
    import shutil

    copy = tmp_path / "lib"
    shutil.copytree(lib, copy)
    (copy / ".bio.tmp-x1y2").mkdir()  # what a killed write leaves
    (copy / ".bio.tmp-x1y2" / "adapter_model.safetensors").write_bytes(b"half")
    assert main(["library", "list", str(copy), "--json"]) == 0
    assert [m["name"] for m in json.loads(capsys.readouterr().out)] == ["bio", "law"]


def test_a_module_for_layers_the_base_lacks_is_refused(tiny_decoder, lib, tmp_path, capsys):
    import shutil

    copy = tmp_path / "lib"
    shutil.copytree(lib, copy)
    cfg = json.loads((copy / "law" / "adapter_config.json").read_text())
    cfg["target_modules"] = ["no_such_proj"]
    (copy / "law" / "adapter_config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    t = load_file(str(copy / "law" / "adapter_model.safetensors"))
    save_file({k.replace("q_proj", "no_such_proj"): v for k, v in t.items()}, str(copy / "law" / "adapter_model.safetensors"))
    train = _jsonl(tmp_path / "train.jsonl", _rows())
    line = cli_error(capsys, _finetune(tmp_path, tiny_decoder, copy, train, train))
    assert "law" in line and "no_such_proj" in line


def test_a_pretrain_all_config_with_an_unknown_key_is_refused(tiny_decoder, corpora, tmp_path, capsys):
    cfg = tmp_path / "domains.yaml"
    cfg.write_text(json.dumps({"base": tiny_decoder, "defaults": {"max_step": 3},
                               "domains": {"bio": {"data": [corpora["bio"]]}}}))
    line = cli_error(capsys, ["pretrain-all", "--config", str(cfg), "--library", str(tmp_path / "lib")])
    assert "max_step" in line and "max_steps" in line  # the typo and what was meant
    cfg.write_text(json.dumps({"base": tiny_decoder, "domain": {"bio": {"data": [corpora["bio"]]}}}))
    line = cli_error(capsys, ["pretrain-all", "--config", str(cfg), "--library", str(tmp_path / "lib")])
    assert "'domain'" in line


def test_a_new_task_head_loads_quietly_and_missing_backbone_weights_are_named(tiny_decoder, tmp_path, capfd):
    """transformers' MISSING report for the fresh classification head is expected and left out (so is
    its loading bar); a checkpoint that lacks part of its backbone is named in a warning."""
    import shutil

    from safetensors.torch import load_file, save_file

    from domix.finetune.taskmodel import load_task_base

    task = load_task_base(tiny_decoder, "classify", ["a", "b"])
    assert task.head == ["score.weight"]
    out = "".join(capfd.readouterr())
    assert "LOAD REPORT" not in out and "Loading weights" not in out  # nor transformers' loading bar
    broken = tmp_path / "broken"
    shutil.copytree(tiny_decoder, broken)
    weights = load_file(str(broken / "model.safetensors"))
    gone = "model.layers.0.mlp.up_proj.weight"
    save_file({k: v for k, v in weights.items() if k != gone}, str(broken / "model.safetensors"))
    with pytest.warns(UserWarning, match=f"lacks 1 backbone weight.*{gone}"):
        task = load_task_base(str(broken), "classify", ["a", "b"], warn=True)
    assert gone in task.head


@pytest.mark.parametrize("name", [".hidden", "a/b", ""])
def test_every_command_that_names_a_new_entry_refuses_a_name_that_is_not_a_folder_name(name, tiny_decoder, corpora,
                                                                                       lib, tmp_path, capsys):
    new = tmp_path / "new"
    common = ["--base", tiny_decoder, "--max-steps", "1", "--seq-len", "16", "--device", "cpu"]
    commands = {
        "pretrain": ["pretrain", "--domain", name, "--data", corpora["bio"], "--library", str(new), *common],
        "mode pretrain": ["mode", "pretrain", "--domain", name, "--data", corpora["bio"], "--library", str(new),
                          *common],
        "library add": ["library", "add", "--library", str(new), "--adapter", str(lib / "bio"), "--domain", name,
                        "--base", tiny_decoder],
        "library merge": ["library", "merge", "--library", str(lib), "--modules", "bio,law", "--combination",
                          "linear", "--out", name],
        "library compress": ["library", "compress", "--library", str(lib), "--module", "bio", "--rank", "2",
                             "--out", name],
    }
    before = sorted(p.name for p in lib.rglob("*"))
    for command, argv in commands.items():
        line = cli_error(capsys, argv)
        assert f"invalid {'domain' if 'pretrain' in command else 'module'} name {name!r}" in line, command
    assert not new.exists() or not any(new.iterdir())
    assert sorted(p.name for p in lib.rglob("*")) == before
