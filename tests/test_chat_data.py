"""chat_data.py: questions only, deduplicated, a seeded split whose held-out part is never trained on, answers written
as well-formed chat turns, reproducible for a seed and cached; eval.py's chat task scores only the answers."""
import json
import math

import pyarrow as pa
import pytest
import torch

import chat_data
import eval as E
from balcony import BalconyModel
from cli import UsageError
from model import Transformer
from tokenizer import Tokenizer


def write_split(root, parts, rows):
    folder = root.joinpath("hf_datasets", *parts)
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)


@pytest.fixture
def evals(tmp_path):
    """A fetched-evals folder in miniature: every source, answers included (they must never be read)."""
    root, S = tmp_path / "evals", chat_data.SOURCES
    write_split(root, S["trivia_qa"][0], [{"question": f"Who wrote book {i}?", "answer": "SECRET"} for i in range(8)]
                + [{"question": "WHO wrote book 1 ?", "answer": "SECRET"}])  # a duplicate up to case and spaces
    write_split(root, S["nq_open"][0], [{"question": f"when did war {i} end", "answer": ["SECRET"]} for i in range(6)])
    write_split(root, S["sciq"][0], [{"question": f"What is cell part {i}?", "correct_answer": "SECRET"}
                                     for i in range(5)])
    write_split(root, S["commonsense_qa"][0], [{"question": f"Where is place {i}?", "answerKey": "A"}
                                               for i in range(4)])
    write_split(root, S["social_iqa"][0], [{"context": f"Kim met friend {i}.", "question": "How would Kim feel?",
                                            "answerA": "SECRET", "label": "1"} for i in range(4)])
    return root


def test_questions_deduplicated_and_split_disjoint(evals):
    qs = chat_data.load_questions(evals)
    assert qs["nq_open"][0] == "When did war 0 end?" and qs["social_iqa"][0] == "Kim met friend 0. How would Kim feel?"
    val, train = chat_data.split_questions(qs, seed=3, n_val=5, n_train=20)
    keys = [chat_data.normalize(q) for _, q in val + train]
    assert len(keys) == len(set(keys)) == 25  # the duplicate trivia question appears once
    assert {s for s, _ in val} == set(chat_data.SOURCES)  # round robin: every source in the held-out part
    assert chat_data.split_questions(qs, seed=3, n_val=5, n_train=20) == (val, train)  # deterministic
    val2, train2 = chat_data.split_questions(qs, seed=3, n_val=5, n_train=10)
    assert val2 == val and train2 == train[:10]  # a smaller training set keeps the held-out part
    assert chat_data.split_questions(qs, seed=4, n_val=5, n_train=20)[0] != val
    with pytest.raises(UsageError, match="distinct questions"):
        chat_data.split_questions(qs, seed=3, n_val=5, n_train=30)


def run(ckpt, evals, out, *extra):
    args = chat_data.get_parser().parse_args(["--checkpoint", str(ckpt), "--evals-dir", str(evals), "--out", str(out),
                                              "--n-train", "7", "--n-val", "4", "--max-new-tokens", "6",
                                              "--batch-size", "3", "--device", "cpu", *extra])
    return chat_data.main(args)


def test_generate_well_formed_reproducible_cached(tiny_ckpt, evals, tmp_path, capsys):
    run(tiny_ckpt, evals, tmp_path / "a")
    run(tiny_ckpt, evals, tmp_path / "b")
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()  # same seed, same data
    train = [json.loads(line) for line in (tmp_path / "a" / "train.jsonl").open()]
    val = [json.loads(line) for line in (tmp_path / "a" / "val.jsonl").open()]
    assert len(train) == 7 and len(val) == 4
    tok = Tokenizer.from_checkpoint(tiny_ckpt)
    for row in train + val:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant" and user["content"]
        assert "SECRET" not in json.dumps(row)  # questions only, never the sets' answers
        assert "<|im_end|>" not in assistant["content"] and "<|im_start|>" not in assistant["content"]
        ids, n = E.answer_tokens(tok, row["messages"])  # renders through the template, answer after the prompt
        assert n >= 1 and ids[-1] in tok.stop_ids
    held_out = {chat_data.normalize(r["messages"][0]["content"]) for r in val}
    assert held_out.isdisjoint(chat_data.normalize(r["messages"][0]["content"]) for r in train)
    assert chat_data.read_chats(tmp_path / "a" / "val.jsonl") == [r["messages"] for r in val]
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["train"]["chats"] == 7 and meta["train"]["tokens"] > meta["train"]["answer_tokens"] > 0
    mtime = {n: (tmp_path / "a" / n).stat().st_mtime_ns for n in ("train.jsonl", "val.jsonl")}
    capsys.readouterr()
    run(tiny_ckpt, evals, tmp_path / "a")
    assert capsys.readouterr().out.count("cached") == 2
    assert all((tmp_path / "a" / n).stat().st_mtime_ns == t for n, t in mtime.items())
    run(tiny_ckpt, evals, tmp_path / "a", "--n-train", "5")  # another training size: the held-out part is kept
    assert (tmp_path / "a" / "val.jsonl").stat().st_mtime_ns == mtime["val.jsonl"]
    assert (tmp_path / "a" / "train.jsonl").read_text().splitlines() == [json.dumps(r) for r in train[:5]]
    run(tiny_ckpt, evals, tmp_path / "a", "--seed", "5")  # other settings: everything regenerated
    assert json.loads((tmp_path / "a" / "meta.json").read_text())["config"]["seed"] == 5
    assert (tmp_path / "a" / "val.jsonl").stat().st_mtime_ns != mtime["val.jsonl"]


def test_answers_equal_batch_one_greedy(tiny_ckpt):
    from generate import generate

    bm = BalconyModel(Transformer.from_checkpoint(tiny_ckpt), []).eval()
    tok = Tokenizer.from_checkpoint(tiny_ckpt)
    qs = ["To be?", "Whether nobler in the mind?", "Or to take arms against a sea of troubles?"]
    got = chat_data.answer(bm, tok, qs, 9, batch_size=2)
    for q, (text, n, finished) in zip(qs, got):
        ref = generate(bm, [tok.encode_chat([{"role": "user", "content": q}])], 9, eos_id=tok.stop_ids)[0]["tokens"]
        assert n == len(ref) and finished == (ref[-1] in tok.stop_ids)
        assert text == tok.decode([t for t in ref if t not in tok.stop_ids]).strip()


def test_bad_chat_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(UsageError, match="bad.jsonl:1:"):
        chat_data.read_chats(bad)


def test_eval_chat_scores_answer_tokens_only(tiny_ckpt):
    torch.manual_seed(0)
    bm = BalconyModel(Transformer.from_checkpoint(tiny_ckpt), [2]).eval()
    tok = Tokenizer.from_checkpoint(tiny_ckpt)
    chats = [[{"role": "user", "content": "To be?"}, {"role": "assistant", "content": "Or not to be."}],
             [{"role": "user", "content": "The slings?"}, {"role": "assistant", "content": "And arrows, 0123."}]]
    full, exit2 = E.eval_heldout_chat(bm, tok, chats, [None, 2], batch_size=2)
    assert full["top1_agree"] == 1.0 and abs(full["kl"]) < 1e-5
    kl = agree = n = 0  # the reference: each chat alone, the answer's positions only
    for m in chats:
        ids, k = E.answer_tokens(tok, m)
        x = torch.tensor([ids])
        p, q = bm(x)[0, -k - 1:-1].log_softmax(-1), bm(x, exit=2)[0, -k - 1:-1].log_softmax(-1)
        kl += (p.exp() * (p - q)).sum().item()
        agree += (p.argmax(-1) == q.argmax(-1)).sum().item()
        n += k
    assert exit2["tokens"] == full["tokens"] == n
    assert math.isclose(exit2["kl"], kl / n, rel_tol=1e-4)
    assert math.isclose(exit2["top1_agree"], agree / n, rel_tol=1e-6)


def test_default_training_data_holds_out_val(tiny_ckpt, evals, tmp_path, monkeypatch):
    import data

    monkeypatch.setattr(data, "CHAT", tmp_path / "chat")
    with pytest.raises(UsageError, match="python chat_data.py"):
        data.data_files(None)
    run(tiny_ckpt, evals, tmp_path / "chat")
    tok = Tokenizer.from_checkpoint(tiny_ckpt)
    folder = data.tokenize_corpus(data.data_files(None), tok, cache_dir=tmp_path / "tokens", num_proc=1)
    for split in ("train", "val"):  # train.py's default split: exactly chat_data.py's, held-out chats never trained on
        chats = chat_data.read_chats(tmp_path / "chat" / f"{split}.jsonl")
        want = [t for m in chats for t in tok.encode_chat(m, add_generation_prompt=False)]
        assert data.open_tokens(folder, split).tolist() == want
