"""data.py: the --data files, documents, the held-out split and the token cache."""
import numpy as np
import pytest
from conftest import write_tiny_tokenizer

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
        eos_id, bos_id, add_bos = 256, 256, False

        def encode(self, text, bos=False, eos=False):
            return [self.bos_id] * bos + list(text.encode()) + [self.eos_id] * eos

    ids = data.load_tokens([plays], Bytes(), "train", cache_dir=tmp_path / "cache").tolist()
    assert ids == [*b"Nothing will come of nothing", 256]
    assert len(list((tmp_path / "cache").iterdir())) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no .txt or .jsonl"):
        data.data_files([tmp_path / "empty"])
    with pytest.raises(UsageError, match="not found"):
        data.data_files([tmp_path / "missing"])
