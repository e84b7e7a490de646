"""data.py: every input format gives the token stream its docstring promises (chats through the chat template),
refusals in one line, 1 process == N processes, the held-out split, and the token cache."""
import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import CORPUS, run_script, write_tiny_tokenizer

import data
from cli import UsageError
from tokenizer import Tokenizer


def test_split_by_file_and_cache_keyed_by_tokenizer(tmp_path):
    plays = tmp_path / "plays"
    plays.mkdir()
    (plays / "hamlet_gut.txt").write_text("To be, or not to be")
    (plays / "hamlet_gut_f.txt").write_text("To be, or not to be, that is the Question")
    (plays / "lear_gut.txt").write_text("Nothing will come of nothing")
    (plays / "notes.md").write_text("not a corpus file")
    (tmp_path / "tok").mkdir()
    tok = Tokenizer.from_checkpoint(write_tiny_tokenizer(tmp_path / "tok" / "tokenizer.json").parent)
    val = data.load_tokens([plays], tok, "val", cache_dir=tmp_path / "cache")
    trn = data.load_tokens([plays], tok, "train", cache_dir=tmp_path / "cache")
    # both editions of Hamlet are held out, each document ends with EOS
    eos = tok.decode([tok.eos_id])
    assert tok.decode(val) == f"To be, or not to be{eos}To be, or not to be, that is the Question{eos}"
    assert tok.decode(trn) == f"Nothing will come of nothing{eos}"
    assert val.dtype == np.uint16

    class Bytes:  # another tokenizer: must not reuse the first one's cache
        eos_id, bos_id, add_bos, vocab_size = 256, 256, False, 257

        def encode(self, text, bos=False, eos=False):
            return [self.bos_id] * bos + list(text.encode()) + [self.eos_id] * eos

        def encode_chat(self, messages, add_generation_prompt=True, today=True):
            raise UsageError("no chat format")

    ids = data.load_tokens([plays], Bytes(), "train", cache_dir=tmp_path / "cache").tolist()
    assert ids == [*b"Nothing will come of nothing", 256]
    assert len(list((tmp_path / "cache").iterdir())) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no .txt, .jsonl"):
        data.data_files([tmp_path / "empty"])
    with pytest.raises(UsageError, match="not found"):
        data.data_files([tmp_path / "missing"])


# ------------------------------------------------------------------------------------------------- input formats
ROWS = [{"text": "To be, or not to be"},
        {"prompt": "What is the question?", "text": "Whether 'tis nobler in the mind to suffer"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who?"},
                      {"role": "assistant", "content": "The slings and arrows"}]},
        {"prompt": None, "text": "0123456789 of outrageous fortune"},
        {"messages": [{"role": "user", "content": "Arms?"}, {"role": "assistant", "content": "Against a sea"}]}]


@pytest.fixture
def tok(tmp_path):
    (tmp_path / "tok").mkdir()
    return Tokenizer.from_checkpoint(write_tiny_tokenizer(tmp_path / "tok" / "tokenizer.json").parent)


def expected_stream(tok, rows) -> list:
    """What ROWS must become, by the rules of data.py's docstring, spelled out with the tokenizer's own calls."""
    ids = []
    for r in rows:
        if r.get("messages"):
            ids += tok.encode_chat(r["messages"], add_generation_prompt=False)
        elif r.get("prompt"):
            chat = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["text"]}]
            ids += tok.encode_chat(chat, add_generation_prompt=False)
        else:
            ids += tok.encode(r["text"], bos=tok.add_bos, eos=True)
    return ids


def all_tokens(folder) -> list:
    return np.concatenate([data.open_tokens(folder, "train"), data.open_tokens(folder, "val")]).tolist()


def write_jsonl(path, rows):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as f:
        f.write("\n".join(json.dumps({k: v for k, v in r.items() if v is not None}) for r in rows) + "\n\n")


def table_of(rows):
    return pa.Table.from_pylist([{k: r.get(k) for k in data.FIELDS if k in set().union(*rows)} for r in rows])


def write_save_to_disk(folder, rows, shards=2):
    """A folder as datasets' Dataset.save_to_disk writes it: Arrow IPC stream shards, state.json, dataset_info.json."""
    folder.mkdir(parents=True)
    table = table_of(rows)
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    per = -(-len(rows) // shards)
    for i, name in enumerate(names):
        with pa.ipc.new_stream(str(folder / name), table.schema) as w:
            w.write_table(table.slice(i * per, per), max_chunksize=2)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "parquet", "save_to_disk"])
def test_each_format_gives_the_templated_token_stream(tmp_path, tok, kind):
    path = tmp_path / f"corpus.{kind}"
    if kind.startswith("jsonl"):
        write_jsonl(path, ROWS)
    elif kind == "parquet":
        pq.write_table(table_of(ROWS), path, row_group_size=2)
    else:
        write_save_to_disk(path, ROWS)
    files = data.data_files([path])
    assert [f.suffix for f in files] == ([".arrow", ".arrow"] if kind == "save_to_disk" else [path.suffix])
    folder = data.tokenize_corpus(files, tok, cache_dir=tmp_path / "cache", num_proc=1)
    assert all_tokens(folder) == expected_stream(tok, ROWS)
    assert json.loads((folder / "meta.json").read_text())["n_docs"] == len(ROWS)
    # the roles as the README says: prompt -> user, text -> assistant; a plain text is not templated
    pair = tok.decode(expected_stream(tok, ROWS[1:2]))
    assert pair == ("<|im_start|>user\nWhat is the question?<|im_end|>\n"
                    "<|im_start|>assistant\nWhether 'tis nobler in the mind to suffer<|im_end|>\n")
    assert tok.decode(expected_stream(tok, ROWS[:1])) == "To be, or not to be" + tok.decode([tok.eos_id])


def test_unknown_types_and_bad_rows_are_refused_in_one_line(tmp_path, tok):
    for name in ("corpus.csv", "corpus.json.gz", "corpus.gz"):
        (tmp_path / name).write_text("text\nTo be\n")
        with pytest.raises(UsageError, match=f"--data {tmp_path / name}: not a type we read"):
            data.data_files([tmp_path / name])
    code, _, err = run_script("data.py", "--data", tmp_path / "corpus.csv", "--checkpoint", tmp_path / "tok")
    assert code == 2 and err.startswith("data.py: error: --data") and err.count("\n") == 1, err
    cases = {"a.jsonl": (b'{"text": "fine"}\n\n{"title": "no text"}\n', "a.jsonl:3: no 'text'"),
             "b.jsonl": (b'{"text": "fine"}\nnot json\n', "b.jsonl:2: not a line of JSON"),
             "f.jsonl": (b'"a JSON string"\n', "f.jsonl:1: not a JSON object"),
             "c.jsonl": (b'{"messages": [{"role": "user"}]}\n', "c.jsonl:1: 'messages' is not a list"),
             "d.parquet": (b"PAR1 not really", "d.parquet: not a readable .parquet file")}
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UsageError, match=expected):
            data.tokenize_corpus([tmp_path / name], tok, cache_dir=tmp_path / "cache", num_proc=2)
    pq.write_table(pa.Table.from_pylist([{"title": "x", "body": "y"}]), tmp_path / "e.parquet")
    with pytest.raises(UsageError, match="e.parquet has no 'text', 'prompt' \\+ 'text' or 'messages' column"):
        data.tokenize_corpus([tmp_path / "e.parquet"], tok, cache_dir=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # no cache, not even a partial one


def test_one_process_equals_many(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(data, "CHUNK_DOCS", 3)  # many chunks in flight at once
    rows = [dict(r, text=r.get("text", "") + f" {i}") if "text" in r else r for i in range(12) for r in ROWS]
    write_jsonl(tmp_path / "a.jsonl.gz", rows)
    pq.write_table(table_of(rows), tmp_path / "b.parquet", row_group_size=5)
    (tmp_path / "c.txt").write_text(CORPUS)
    files = data.data_files([tmp_path])
    one = data.tokenize_corpus(files, tok, val_fraction=0.3, cache_dir=tmp_path / "one", num_proc=1)
    many = data.tokenize_corpus(files, tok, val_fraction=0.3, cache_dir=tmp_path / "many", num_proc=3)
    assert one.name == many.name  # the number of processes is not part of the key: the result is the same
    assert (one / "tokens.bin").read_bytes() == (many / "tokens.bin").read_bytes()
    assert (one / "meta.json").read_text() == (many / "meta.json").read_text()
    assert sorted(all_tokens(one)) == sorted(expected_stream(tok, rows + rows) + tok.encode(CORPUS, eos=True))


def test_fraction_split_is_deterministic_and_disjoint(tmp_path, tok):
    docs = [f"{CORPUS[i:i + 30]} {i}" for i in range(200)] + ["To be, or not to be"] * 5  # five copies
    write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs[:120]])
    write_jsonl(tmp_path / "b.jsonl", [{"text": d} for d in docs[120:]])

    def split(files, cache):
        folder = data.tokenize_corpus(files, tok, val_fraction=0.25, cache_dir=tmp_path / cache, num_proc=2)
        eos = tok.decode([tok.eos_id])
        return [tok.decode(data.open_tokens(folder, s)).split(eos)[:-1] for s in ("train", "val")]

    train, val = split([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], "c1")
    assert sorted(train + val) == sorted(docs)  # every document once, on one side
    assert not set(train) & set(val)  # so the copies went together
    assert 30 <= len(set(val)) <= 70  # about a quarter of 201 distinct documents
    assert split([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], "c2") == [train, val]  # again: the same
    other = split([tmp_path / "b.jsonl", tmp_path / "a.jsonl"], "c3")  # files in another order: the same documents
    assert (sorted(other[0]), sorted(other[1])) == (sorted(train), sorted(val))
    # the held-out files of a save_to_disk DatasetDict, by path pattern
    write_save_to_disk(tmp_path / "dd" / "train", [{"text": d} for d in docs[:50]], shards=1)
    write_save_to_disk(tmp_path / "dd" / "test", [{"text": d} for d in docs[50:60]], shards=1)
    folder = data.tokenize_corpus(data.data_files([tmp_path / "dd"]), tok, "*/test/*", tmp_path / "c4")
    assert data.open_tokens(folder, "val").tolist() == expected_stream(tok, [{"text": d} for d in docs[50:60]])


def test_cache_is_atomic_keyed_by_content_and_waited_for(tmp_path, tok, monkeypatch):
    path = tmp_path / "a.jsonl"
    write_jsonl(path, ROWS)
    monkeypatch.setattr(data, "WAIT_S", 0.5)
    with pytest.raises(UsageError, match="waited 0 s for rank 0 to tokenise"):
        data.tokenize_corpus([path], tok, cache_dir=tmp_path / "cache", wait=True)  # nobody writes it
    first = data.tokenize_corpus([path], tok, cache_dir=tmp_path / "cache")
    assert data.tokenize_corpus([path], tok, cache_dir=tmp_path / "cache", wait=True) == first  # there: no wait
    write_jsonl(path, ROWS[::-1])  # same size, new content and mtime
    second = data.tokenize_corpus([path], tok, cache_dir=tmp_path / "cache")
    assert second != first and all_tokens(second) == expected_stream(tok, ROWS[::-1])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([first.name, second.name])


def test_llama32_chats_tokenise_the_same_on_any_day(tmp_path, monkeypatch):
    # Llama-3.2's template writes today's date into every chat: training text rendered with the template's own fixed
    # date instead, the tokens, the cache key and so train.py --resume's check do not change at midnight
    import datetime as dt

    import tokenizer
    from test_tokenizer import LLAMA32_TEMPLATE
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    (tmp_path / "tok").mkdir()
    write_tiny_tokenizer(tmp_path / "tok" / "tokenizer.json", specials)
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": LLAMA32_TEMPLATE, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    tok = Tokenizer.from_checkpoint(tmp_path / "tok")
    write_jsonl(tmp_path / "chats.jsonl", ROWS[1:3])
    folders = []
    for now in (dt.datetime(2026, 12, 4, 23, 59), dt.datetime(2026, 12, 5, 0, 1)):
        monkeypatch.setattr(tokenizer, "datetime", type("Clock", (), {"now": staticmethod(lambda now=now: now)}))
        folders.append(data.tokenize_corpus([tmp_path / "chats.jsonl"], tok, cache_dir=tmp_path / "cache"))
    assert folders[0] == folders[1]
    assert tok.decode(all_tokens(folders[0])).count("Today Date: 26 Jul 2024\n") == 2
    assert "Today Date: 05 Dec 2026" in tok.apply_chat_template([{"role": "user", "content": "Hi"}])  # prompts: today


def test_byte_order_mark_is_not_text(tmp_path, tok):
    for name, text in [("a.txt", "To be, or not to be"), ("b.jsonl", json.dumps({"text": "To be, or not to be"}))]:
        (tmp_path / name).write_text("\ufeff" + text, encoding="utf-8")
        folder = data.tokenize_corpus([tmp_path / name], tok, cache_dir=tmp_path / "cache")
        assert all_tokens(folder) == tok.encode("To be, or not to be", bos=tok.add_bos, eos=True)
