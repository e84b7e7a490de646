"""
The tokenizer of a converted checkpoint, with two backends and no jinja:

- tiktoken for byte-level BPE: a Hugging Face tokenizer.json (GPT-2 / SmolLM2 / Llama-3 style, as convert_hf.py also
  writes for GGUF models) or Llama-3's tiktoken-format tokenizer.model (base64 token + rank per line);
- sentencepiece for a Llama-2 style tokenizer.model.

encode() never parses special tokens out of plain text unless told to (allowed_special="all", or encode_chat), and
adds BOS only when asked: `add_bos` says whether the model expects one before raw text (Llama: yes, SmolLM2: no).
apply_chat_template() writes ChatML (SmolLM2) or Llama-3's header format in Python, picked by the special tokens.
"""
import base64
import json
import re
from datetime import datetime
from pathlib import Path

from cli import UsageError

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM2 (llama.cpp's 'smollm', HF's Sequence[Digits(individual), ByteLevel]): each digit is its own piece, then
# GPT-2's regex runs on the text between digits. As one regex: \p{N} first, and a whitespace run before a digit is
# kept whole, as it would be at the end of a between-digits chunk.
SMOLLM_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Llama-3.1's tokenizer.model holds only the 128000 BPE ranks; its 256 special tokens follow, in this order
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(LLAMA3_SPECIALS))]
# stop-of-turn tokens a chat generation should also stop at, whatever the eos is
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>")


def gpt2_byte_decoder() -> dict:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others map to chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def check_merge_ranks(model: dict, path: Path):
    """tiktoken applies, at each step, the merge whose result has the lowest id; HF's BPE applies the earliest merge
    in the list. The two agree when the ids of merge results never decrease along the merge list: refuse otherwise."""
    vocab, prev = model["vocab"], -1
    for i, merge in enumerate(model["merges"]):
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        rank = vocab.get(a + b)
        if rank is None or rank < prev:
            raise UsageError(f"{path}: merge {i} ({a} {b}) " + ("makes no token of the vocabulary" if rank is None else
                             f"makes id {rank}, below an earlier merge's {prev}") + "; only tokenizers whose ids "
                             "follow their merges are supported")
        prev = rank


def bytelevel_pattern(pre: dict) -> str:
    """The single split regex equivalent to a tokenizer.json byte-level pre_tokenizer."""
    steps = pre.get("pretokenizers", []) if pre and pre["type"] == "Sequence" else [pre]
    kinds = [s["type"] if s else None for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_PATTERN
    if kinds in (["Digits", "ByteLevel"], ["Split", "ByteLevel"]) and steps[1].get("use_regex", True):
        digits = steps[0].get("individual_digits") or steps[0].get("pattern", {}).get("Regex") in (r"\p{N}", r"\d")
        if digits and steps[0].get("behavior", "Isolated") == "Isolated":
            return SMOLLM_PATTERN
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) and "Regex" in steps[0]["pattern"]:
        return steps[0]["pattern"]["Regex"]  # Llama-3's tokenizer.json: its own regex, then bytes only
    raise UsageError(f"tokenizer.json pre_tokenizer {kinds} is not supported (GPT-2, SmolLM2 and Llama-3 styles are)")


class Tokenizer:
    def __init__(self, path: Path):
        import tiktoken
        json_file, model_file = path / "tokenizer.json", path / "tokenizer.model"
        config = json.loads((path / "tokenizer_config.json").read_text()) \
            if (path / "tokenizer_config.json").is_file() else {}
        self.sp, self.chat_template = None, config.get("chat_template")
        if isinstance(self.chat_template, list):  # some configs list named templates
            self.chat_template = next((t["template"] for t in self.chat_template if t["name"] == "default"), None)
        tj = json.loads(json_file.read_text()) if json_file.is_file() else {}
        # a Llama-2 folder's tokenizer.json is sentencepiece-style BPE: its tokenizer.model is read instead
        if tj.get("model", {}).get("type") == "BPE" and (tj.get("decoder") or {}).get("type") == "ByteLevel":
            model = tj["model"]
            self.special = {t["content"]: t["id"] for t in tj["added_tokens"]}  # HF matches all added tokens
            byte_of = gpt2_byte_decoder()
            ranks = {bytes(byte_of[c] for c in tok): i for tok, i in model["vocab"].items() if tok not in self.special}
            check_merge_ranks(model, json_file)
            pattern = bytelevel_pattern(tj["pre_tokenizer"])
            # Llama-3's tokenizer.json prepends <|begin_of_text|> with a TemplateProcessing post-processor
            self.add_bos = config.get("add_bos_token", "TemplateProcessing" in json.dumps(tj.get("post_processor")))
        elif model_file.is_file() and re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", model_file.open("rb").readline().strip()):
            ranks = {base64.b64decode(tok): int(rank) for tok, rank in
                     (line.split() for line in model_file.read_text().splitlines() if line)}
            self.special = {s: len(ranks) + i for i, s in enumerate(LLAMA3_SPECIALS)}
            pattern, self.add_bos = LLAMA3_PATTERN, True
        elif model_file.is_file():
            import sentencepiece
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
            self.vocab_size = self.sp.get_piece_size()
            self.known = range(self.vocab_size)
            self.special = {self.sp.id_to_piece(i): i for i in range(self.vocab_size) if self.sp.is_control(i)}
            self.bos_id, self.eos_id, self.add_bos = self.sp.bos_id(), self.sp.eos_id(), True
        elif tj:
            raise UsageError(f"{json_file}: only byte-level BPE tokenizer.json is supported (or a tokenizer.model)")
        else:
            raise UsageError(f"{path} has no tokenizer.json or tokenizer.model; convert the model with convert_hf.py")
        if self.sp is None:
            self.vocab_size = max([*ranks.values(), *self.special.values()]) + 1
            self.known = {*ranks.values(), *self.special.values()}
            self.tt = tiktoken.Encoding(path.name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=self.special)
            self.pattern = pattern
            self.missing = bytes(b for b in range(256) if bytes([b]) not in ranks)  # SmolLM2 lacks e.g. 0x04
            self.bos_id = self._token_id(config.get("bos_token"), ["<|begin_of_text|>", "<s>", "<|im_start|>"])
            self.eos_id = self._token_id(config.get("eos_token"), ["<|end_of_text|>", "</s>", "<|im_end|>",
                                                                    "<|endoftext|>"])
        # generation stops at eos, generation_config's eos ids (Llama-3.1-Instruct lists three) and end-of-turn tokens
        gen = path / "generation_config.json"
        gen_eos = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
        self.stop_ids = {self.eos_id, *([gen_eos] if isinstance(gen_eos, int) else gen_eos or [])}
        self.stop_ids |= {self.special[t] for t in END_OF_TURN if t in self.special}
        self.stop_ids.discard(None)

    def _token_id(self, token, fallbacks):
        if isinstance(token, dict):  # {"content": "<s>", "lstrip": ...}
            token = token["content"]
        for t in ([token] if token else fallbacks):
            if t in self.special:
                return self.special[t]
        return None

    @classmethod
    def from_checkpoint(cls, path) -> "Tokenizer":
        path = Path(path)
        if not path.is_dir():
            raise UsageError(f"{path} is not a checkpoint folder; convert one first: python convert_hf.py --default")
        return cls(path)

    def _encode_ordinary(self, text: str) -> list:
        if self.sp is not None:
            return self.sp.encode(text)
        raw = text.encode("utf-8", "surrogatepass")
        if len(raw.translate(None, self.missing)) == len(raw):
            return self.tt.encode_ordinary(text)
        # tiktoken panics on a byte that has no token of its own; HF's BPE drops such bytes from each pre-tokenized
        # piece before merging, so do just that, piece by piece
        import regex
        ids = []
        for piece in regex.findall(self.pattern, text):
            piece = piece.encode("utf-8", "surrogatepass").translate(None, self.missing)
            ids += self.tt._encode_single_piece(piece) if piece else []
        return ids

    def encode(self, text: str, bos: bool = False, eos: bool = False, allowed_special=()) -> list:
        """Token ids of text; special tokens are plain text unless listed in allowed_special (or it is "all")."""
        specials = self.special if allowed_special == "all" else {s: self.special[s] for s in allowed_special}
        ids = [self.bos_id] if bos else []
        if specials:
            # split around the specials (longest first), encode the text between them
            parts = re.split("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")", text)
            for i, part in enumerate(parts):
                ids += [specials[part]] if i % 2 else self._encode_ordinary(part)
        else:
            ids += self._encode_ordinary(text)
        return ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        # ids with no token (a model's vocabulary padded past the tokenizer's can sample one) are skipped, as HF's
        # tokenizers skip them; bad UTF-8 becomes U+FFFD
        ids = [i for i in ids if i in self.known]
        return self.sp.decode(ids) if self.sp is not None else self.tt.decode(ids)

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True, today: bool = True) -> str:
        """The prompt text for a list of {"role", "content"} messages; encode it with encode_chat or
        encode(text, allowed_special="all"). today=False: a template that writes today's date (Llama-3.2's) writes
        its fixed one instead, the date it renders without a clock, so training text does not change with the day."""
        if "<|im_start|>" in self.special and "<|im_end|>" in self.special:  # ChatML: SmolLM2, Qwen
            # SmolLM2's template adds a default system prompt when the chat has none; take it from the template
            default = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", self.chat_template or "", re.S)
            if default and messages and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": default.group(1)}, *messages]
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        if "<|start_header_id|>" in self.special:  # Llama-3 (Meta's ChatFormat)
            text = "<|begin_of_text|>"
            # Llama-3.1/3.2's templates always open with a system turn: knowledge cutoff, a date (3.2: today's, 3.1:
            # a fixed one), then the chat's own system prompt if it has one. Both are read from the template.
            template = self.chat_template or ""
            cutoff = re.search(r'"Cutting Knowledge Date: (.*?)\\n"', template)
            if cutoff:
                system = ""
                if messages and messages[0]["role"] == "system":
                    system, messages = messages[0]["content"].strip(), messages[1:]
                clock = re.search(r'strftime_now\("(.*?)"\)', template)
                fixed = re.search(r'set date_string = "(.*?)"', template)
                if clock and (today or not fixed):  # a template with a clock and no fixed date: today's, always
                    date = datetime.now().strftime(clock.group(1))
                elif fixed:
                    date = fixed.group(1)
                else:
                    raise UsageError("the chat template has a Cutting Knowledge Date line but no date; it is not "
                                     "Llama-3.1/3.2's template, prompt with plain text")
                text += (f"<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: {cutoff.group(1)}\n"
                         f"Today Date: {date}\n\n{system}<|eot_id|>")
            text += "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
                            for m in messages)
            return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")
        raise UsageError("this tokenizer has no chat format (no ChatML <|im_start|> or Llama-3 <|start_header_id|> "
                         "tokens); prompt it with plain text")

    def encode_chat(self, messages: list, add_generation_prompt: bool = True, today: bool = True) -> list:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, today), allowed_special="all")
