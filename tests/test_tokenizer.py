"""tokenizer.py: ids equal Hugging Face `tokenizers` on tiny byte-level BPEs (GPT-2, SmolLM2 and Llama-3 splits) and
a tiny sentencepiece model; decode(encode(x)) == x; specials only on request; chat formats."""
import base64
import io
import json

import pytest

from conftest import CORPUS, write_tiny_tokenizer
from cli import UsageError
from tokenizer import LLAMA3_PATTERN, Tokenizer, gpt2_byte_decoder

TEXTS = {
    "prose": "To be, or not to be, that is the question: Whether 'tis nobler in the mind. I'll say they're HERE.",
    "code": "def f(x):\n    return x**2  # square\n\tif a != b: print(f'{a!r}')\n}}",
    "numbers": "In 2024, 3.14159 * 1,000,000 = 3141590.0; call 555-0123 or ٣٤٥ ½ x2 9th",
    "unicode": "Ünïcödé — 日本語のテキスト, emoji 😀👍🏽, Ελληνικά, عربي",
    "whitespace": "  lead\t\ttabs   runs \n\n\n  trailing   ",
    "control": "ctrl \x00\x04\x06\x13\x1b[0m \x7f end",
}
SMOLLM2_TEMPLATE = (  # SmolLM2-135M-Instruct's chat_template, verbatim
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def bytelevel_dir(tmp_path, style: str):
    """A folder with the tiny conftest BPE, its pre-tokenizer swapped for `style`; returns (folder, HF tokenizer)."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, pre_tokenizers as pt
    hf = HFTokenizer.from_file(str(write_tiny_tokenizer(tmp_path / "tokenizer.json")))
    hf.pre_tokenizer = {
        "gpt2": pt.ByteLevel(add_prefix_space=False),
        "smollm-digits": pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)]),
        "smollm-split": pt.Sequence([pt.Split(Regex(r"\p{N}"), "isolated"), pt.ByteLevel(add_prefix_space=False)]),
        "llama3": pt.Sequence([pt.Split(Regex(LLAMA3_PATTERN), "isolated"),
                               pt.ByteLevel(add_prefix_space=False, use_regex=False)]),
    }[style]
    hf.save(str(tmp_path / "tokenizer.json"))
    return tmp_path, hf


@pytest.mark.parametrize("style", ["gpt2", "smollm-digits", "smollm-split", "llama3"])
def test_bytelevel_matches_hf(tmp_path, style):
    path, hf = bytelevel_dir(tmp_path, style)
    tok = Tokenizer.from_checkpoint(path)
    for name, text in TEXTS.items():
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids, name
        assert tok.decode(ids) == text, name


def test_specials_only_on_request(tiny_ckpt):
    tok = Tokenizer.from_checkpoint(tiny_ckpt)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (300, 1, 2)
    assert tok.encode("<|im_end|>") != [2] and tok.decode(tok.encode("<|im_end|>")) == "<|im_end|>"
    assert tok.encode("a<|im_end|>", allowed_special="all")[-1] == 2
    assert tok.encode("a<|im_end|>", allowed_special={"<|im_start|>"}) == tok.encode("a<|im_end|>")
    ids = tok.encode("hi", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 2 in tok.stop_ids


def test_missing_byte_tokens_are_dropped_like_hf(tmp_path):
    # a BPE trained without the full byte alphabet (SmolLM2 lacks e.g. 0x04): tiktoken alone would panic
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=100, special_tokens=["<|endoftext|>"],
                                                         show_progress=False))
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_checkpoint(tmp_path)
    for text in [TEXTS["control"], TEXTS["unicode"], "To be \x04 or"]:
        assert tok.encode(text) == hf.encode(text).ids


def test_chatml_matches_jinja_template(tmp_path):
    import jinja2
    path, _ = bytelevel_dir(tmp_path, "smollm-digits")
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": SMOLLM2_TEMPLATE,
                                                            "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    tok = Tokenizer.from_checkpoint(path)
    template = jinja2.Environment().from_string(SMOLLM2_TEMPLATE)
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]]
    for messages in chats:
        for gen in (True, False):
            assert tok.apply_chat_template(messages, gen) == template.render(messages=messages,
                                                                             add_generation_prompt=gen)
    ids = tok.encode_chat(chats[0])
    assert ids.count(1) == 3 and ids.count(2) == 2 and ids[0] == 1  # <|im_start|> x3, <|im_end|> x2


def tiny_sentencepiece(path):
    import sentencepiece as spm
    model = io.BytesIO()
    # Llama-2's settings: BPE, byte fallback, no normalisation, a dummy-prefix space, whitespace runs kept
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS.split(". ")), model_writer=model, vocab_size=330,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, split_digits=True, character_coverage=1.0,
                                   minloglevel=2)
    (path / "tokenizer.model").write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))


def hf_from_sentencepiece(sp):
    """HF's Llama-2 fast tokenizer for a sentencepiece BPE, built as transformers' LlamaConverter does it."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []  # every split of a piece into two pieces, ordered by the merged piece's score
    for piece, i in vocab.items():
        pairs = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += [(l, r, sp.get_score(i)) for l, r in sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    merges = [(l, r) for l, r, _ in sorted(merges, key=lambda m: m[2], reverse=True)]
    hf = HFTokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    return hf


def test_sentencepiece_matches_hf(tmp_path):
    sp = tiny_sentencepiece(tmp_path)
    hf = hf_from_sentencepiece(sp)
    hf.save(str(tmp_path / "tokenizer.json"))  # as in a Llama-2 folder: not byte-level, so tokenizer.model is read
    tok = Tokenizer.from_checkpoint(tmp_path)
    assert tok.sp is not None
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (sp.get_piece_size(), 1, 2)
    for name, text in TEXTS.items():
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids, name
        assert tok.decode(ids) == text, name
    assert tok.encode("</s>") != [2] and tok.encode("a</s>", allowed_special="all")[-1] == 2
    with pytest.raises(UsageError, match="no chat format"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_llama3_tiktoken_file(tmp_path):
    import tiktoken
    # a Llama-3-format tokenizer.model (base64 token, rank) from the tiny BPE's byte tokens, ranks 0..n-1
    path, _ = bytelevel_dir(tmp_path, "llama3")
    byte_of = gpt2_byte_decoder()
    vocab = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
    pieces = [bytes(byte_of[c] for c in t) for t in sorted(vocab, key=vocab.get) if not t.startswith("<|")]
    (path / "tokenizer.json").unlink()
    lines = [f"{base64.b64encode(p).decode()} {i}\n" for i, p in enumerate(pieces)]
    (path / "tokenizer.model").write_text("".join(lines))
    ref = tiktoken.Encoding("ref", pat_str=LLAMA3_PATTERN, mergeable_ranks={p: i for i, p in enumerate(pieces)},
                            special_tokens={})
    tok = Tokenizer.from_checkpoint(path)
    n = len(pieces)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (n + 256, n, n + 1)
    for name, text in TEXTS.items():
        assert tok.encode(text) == ref.encode_ordinary(text) and tok.decode(tok.encode(text)) == text, name
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    header, eot = tok.special["<|start_header_id|>"], tok.special["<|eot_id|>"]
    assert ids[:2] == [n, header] and ids.count(eot) == 1 and eot in tok.stop_ids
    assert tok.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_decode_skips_ids_outside_the_vocabulary_like_hf(tmp_path):
    # a model's vocabulary can be padded past the tokenizer's (the tiny model has 320 rows, the tokenizer 300 ids);
    # HF's tokenizers skip such ids, and so do we, with both backends
    (tmp_path / "bpe").mkdir()
    path, hf = bytelevel_dir(tmp_path / "bpe", "gpt2")
    sp = tiny_sentencepiece(tmp_path)
    for tok, n in ((Tokenizer.from_checkpoint(path), 300), (Tokenizer.from_checkpoint(tmp_path), sp.get_piece_size())):
        ids = tok.encode("To be, or not")
        padded = ids[:2] + [n, n + 19] + ids[2:] + [10**6]
        assert tok.decode(padded) == tok.decode(ids) == "To be, or not"
        assert tok.sp or hf.decode(padded) == "To be, or not"


def test_vocabulary_ids_that_do_not_follow_the_merges_are_refused(tmp_path):
    # tiktoken merges by the result's id, HF's BPE by the merge's place in the list: they must agree
    tj = json.loads(write_tiny_tokenizer(tmp_path / "tokenizer.json").read_text())
    vocab, merges = tj["model"]["vocab"], tj["model"]["merges"]
    first, last = ("".join(m.split(" ")) if isinstance(m, str) else "".join(m) for m in (merges[0], merges[-1]))
    vocab[first], vocab[last] = vocab[last], vocab[first]  # the first merge now makes the highest id
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(UsageError, match=r"merge 1 \(.*\) makes id \d+, below an earlier merge's \d+"):
        Tokenizer.from_checkpoint(tmp_path)


# Llama-3.1-8B-Instruct's and Llama-3.2-1B-Instruct's chat_template, verbatim from their tokenizer_config.json
LLAMA31_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
LLAMA32_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""


@pytest.mark.parametrize("template", [LLAMA31_TEMPLATE, LLAMA32_TEMPLATE], ids=["3.1", "3.2"])
def test_llama31_chat_matches_transformers_apply_chat_template(tmp_path, template):
    # a tiny Llama-3-style byte-level BPE with Llama-3's chat tokens, and transformers rendering the real template
    from transformers import PreTrainedTokenizerFast
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    write_tiny_tokenizer(tmp_path / "tokenizer.json", specials)
    config = {"chat_template": template, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), **config)
    tok = Tokenizer.from_checkpoint(tmp_path)
    chats = [[{"role": "user", "content": "What is the capital of France? "}],
             [{"role": "system", "content": " Be brief.\n"}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]]
    for messages in chats:
        for gen in (True, False):
            text = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert tok.apply_chat_template(messages, gen) == text
            fixed = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False,
                                           date_string="26 Jul 2024")  # the template's own, without a clock
            assert tok.apply_chat_template(messages, gen, today=False) == fixed
            assert tok.encode_chat(messages, gen) == hf.apply_chat_template(messages, add_generation_prompt=gen,
                                                                                 return_dict=False)
    assert "Cutting Knowledge Date: December 2023\nToday Date: " in text
