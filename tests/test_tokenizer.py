"""Tokenizer parity with transformers, chat-template rendering, message validation, and the
incremental detokenizer's contract (pushes + flush == one-shot decode, never half a character)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pd_local.tokenizer import ChatTemplateError, IncrementalDetokenizer, Tokenizer, compile_chat_template
from tests.helpers import byte_level_alphabet, make_byte_fallback_tokenizer_dir

TEXTS = [
    "Hello world",
    "1234567890 and 3.14159, year 2024",
    "x=12.5e10;y=0x1F",
    "😀🎉 emoji 👍🏽 family 👨‍👩‍👧",
    "日本語のテキスト 中文字符 한국어",
    "def f(x):\n\treturn x ** 2\n\nclass A:\n    pass\n",
    "   lots    of\n\n\n  whitespace \t\t end  ",
    "naïve café über ß",
    "<|im_start|>user\nhi<|im_end|>\n",
    "a1b2c3 ,.;:!? \"quotes\" 'single'",
    "\u00a0nbsp\u200bzero-width",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 😀"}],
    [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Write  code:\n\tprint(1)"},
    ],
]


@pytest.fixture(scope="module")
def tok(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


@pytest.fixture(scope="module")
def hf_tok(smollm2_dir: Path):  # noqa: ANN201
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def bf_tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_dir(make_byte_fallback_tokenizer_dir(tmp_path_factory.mktemp("bf")))


# --------------------------------------------------------------------------------------------
# Encode / decode parity
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_metadata(tok: Tokenizer) -> None:
    assert tok.vocab_size == 49152
    assert tok.eos_token_id == 2 and tok.bos_token_id == 1
    assert tok.stop_token_ids == frozenset({2})
    assert tok.id_to_token(1) == "<|im_start|>"


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok: Tokenizer, hf_tok, text: str) -> None:  # noqa: ANN001
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == text  # byte-level BPE is lossless


@pytest.mark.slow
def test_encode_matches_transformers_gguf_tokenizer(tok: Tokenizer, smollm2_gguf: Path) -> None:
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    for text in TEXTS:
        if any(c.isspace() and n.isdigit() for c, n in zip(text, text[1:])):
            continue  # see test_digits_are_split_before_the_gpt2_regex
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text


@pytest.mark.slow
def test_digits_are_split_before_the_gpt2_regex(tok: Tokenizer) -> None:
    # llama.cpp's 'smollm' pre-tokenizer (and the official SmolLM2 tokenizer.json) split every
    # digit off first, so "  2" is ["ĠĠ", "2"]; transformers' GGUF tokenizer skips that step and
    # gives ["Ġ", "Ġ", "2"] (the GPT-2 regex alone keeps " 2" together).
    assert [tok.id_to_token(i) for i in tok.encode("x  2")] == ["x", "ĠĠ", "2"]
    assert [tok.id_to_token(i) for i in tok.encode("2024")] == ["2", "0", "2", "4"]


@pytest.mark.slow
def test_special_tokens_are_atomic_and_no_bos(tok: Tokenizer) -> None:
    assert tok.encode("<|im_start|>assistant\n")[0] == 1
    assert tok.encode("<|im_end|>") == [2]
    assert tok.encode("hello")[0] != tok.bos_token_id


# --------------------------------------------------------------------------------------------
# Chat template
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(tok: Tokenizer, hf_tok, messages: list, gen: bool) -> None:  # noqa: ANN001
    ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
    assert ours == hf_tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=True)
    assert tok.encode_chat(messages, add_generation_prompt=gen) == list(ids["input_ids"])


@pytest.mark.slow
def test_default_system_prompt_only_without_system_message(tok: Tokenizer) -> None:
    default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    no_sys = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert no_sys.startswith(f"<|im_start|>system\n{default}<|im_end|>\n<|im_start|>user\nhi")
    assert no_sys.endswith("<|im_start|>assistant\n")
    with_sys = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert default not in with_sys and with_sys.startswith("<|im_start|>system\nBe brief.<|im_end|>")


TRICKY_TEMPLATE = """
{%- for m in messages %}
    {%- if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}
    {%- if loop.index > 3 %}{% break %}{% endif %}
    {% generation %}[{{ m['role'] | upper }}] {{ m | tojson }}{% endgeneration %}
{% endfor %}
{%- if add_generation_prompt %}{{ bos_token }}>{% endif %}{{ eos_token }}
"""


def test_template_environment_matches_transformers() -> None:
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models
    from transformers.utils.chat_template_utils import render_jinja_template

    raw = RawTokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    tok = Tokenizer(raw, TRICKY_TEMPLATE, bos_token="<s>", eos_token="</s>")
    msgs = [{"role": "user", "content": "<b>&'é</b>\n  x"}, {"role": "assistant", "content": "ok"}] * 3
    for gen in (True, False):
        ours = tok.apply_chat_template(msgs, add_generation_prompt=gen)
        theirs, _ = render_jinja_template(
            [msgs], chat_template=TRICKY_TEMPLATE, add_generation_prompt=gen, bos_token="<s>", eos_token="</s>",
        )
        assert ours == theirs[0]
    assert "<b>&'é</b>" in ours  # tojson does not HTML-escape and keeps non-ASCII
    with pytest.raises(ChatTemplateError, match="no tools here"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_template_is_sandboxed() -> None:
    from jinja2.exceptions import SecurityError

    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(SecurityError):
        compile_chat_template(evil).render(messages=[])


def test_no_template_is_a_clear_error(bf_tok: Tokenizer) -> None:
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models

    tok = Tokenizer(RawTokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ("hi", "messages must be a list, got str"),
        ([], "messages must not be empty"),
        ([{"role": "user", "content": "a"}, "b"], r"messages\[1\] must be an object, got str"),
        ([{"content": "a"}], r"messages\[0\] has no 'role'"),
        ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}],
         r"messages\[1\]\.role must be one of \['assistant', 'system', 'tool', 'user'\], got 'robot'"),
        ([{"role": "user"}], r"messages\[0\] has no 'content'"),
        ([{"role": "user", "content": None}],
         r"messages\[0\]\.content must be a string or a list of text parts, got NoneType"),
        ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}]}],
         r"messages\[0\]\.content\[1\]: only text parts are supported, got 'image_url'"),
        ([{"role": "user", "content": ["a"]}], r"messages\[0\]\.content\[0\]: only text parts are supported, got str"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], r"messages\[0\]\.content\[0\]\.text must be a string"),
        ([{"role": "user", "content": "a", "name": 5}], r"messages\[0\]\.name must be a string, got int"),
    ],
)
def test_bad_messages(bf_tok: Tokenizer, messages: object, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        bf_tok.apply_chat_template(messages)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=error):
        bf_tok.encode_chat(messages)  # type: ignore[arg-type]


def test_text_parts_developer_role_and_names_render_as_plain_messages(bf_tok: Tokenizer) -> None:
    """What newer OpenAI clients send renders exactly as its plain equivalent."""
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"}]
    sent = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "name": "ann", "content": [{"type": "text", "text": "a"},
                                                        {"type": "text", "text": "b"}]}]
    assert bf_tok.apply_chat_template(sent) == bf_tok.apply_chat_template(plain)
    assert bf_tok.encode_chat(sent) == bf_tok.encode_chat(plain)


def test_stop_ids_and_template_from_files(bf_tok: Tokenizer, tmp_path: Path) -> None:
    # generation_config lists [2, 0]; eos_token </s> is 2.
    assert bf_tok.stop_token_ids == frozenset({0, 2}) and bf_tok.eos_token_id == 2
    assert bf_tok.apply_chat_template([{"role": "user", "content": "hello"}]) == "<s>[user] hello</s>"
    # chat_template.jinja (transformers >= 4.5x layout) is read when tokenizer_config has none.
    d = make_byte_fallback_tokenizer_dir(tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "x"}]) == "x!"


def test_from_dir_without_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
        Tokenizer.from_dir(tmp_path)


# --------------------------------------------------------------------------------------------
# Incremental detokenizer
# --------------------------------------------------------------------------------------------

def stream(tok: Tokenizer, ids: list[int], skip: bool = True) -> list[str]:
    d = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    pieces = [d.push(i) for i in ids]
    pieces.append(d.flush())
    assert d.text == "".join(pieces)
    return pieces


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_equals_one_shot_and_never_splits_a_character(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    for skip in (True, False):
        pieces = stream(tok, ids, skip)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in p for p in pieces)


@pytest.mark.slow
def test_detokenizer_holds_partial_utf8_bytes(tok: Tokenizer) -> None:
    alphabet = byte_level_alphabet()
    emoji = "😀".encode()  # 4 bytes: F0 9F 98 80
    ids = [tok._tok.token_to_id(alphabet[b]) for b in emoji]
    assert None not in ids
    d = IncrementalDetokenizer(tok)
    assert [d.push(i) for i in ids] == ["", "", "", "😀"]
    cjk = tok.encode("你好")
    assert len(cjk) > 2  # multi-token characters, the case this test is about
    pieces = stream(tok, cjk)
    assert "".join(pieces) == "你好" and set(pieces) <= {"", "你", "好"}


def test_detokenizer_byte_fallback_tokens(bf_tok: Tokenizer) -> None:
    text = "hello world 你好 😀 hello"
    ids = bf_tok.encode(text)
    byte_tokens = [i for i in ids if bf_tok.id_to_token(i).startswith("<0x")]
    assert len(byte_tokens) >= 7  # 好 and 😀 are spelled in <0xNN> tokens
    pieces = stream(bf_tok, ids)
    assert "".join(pieces) == bf_tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "😀" in pieces and "好" in pieces or " 好" in pieces


def test_detokenizer_flush_emits_an_incomplete_tail(bf_tok: Tokenizer) -> None:
    half = [bf_tok._tok.token_to_id("<0xE4>"), bf_tok._tok.token_to_id("<0xBD>")]  # 2 of 3 bytes of 你
    d = IncrementalDetokenizer(bf_tok)
    assert d.push(bf_tok.encode("hello")[0]) == "hello"
    assert [d.push(i) for i in half] == ["", ""]
    assert d.flush() == bf_tok.decode(bf_tok.encode("hello") + half)[len("hello"):]
    assert d.flush() == ""


@pytest.mark.slow
def test_detokenizer_window_stays_small(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = tok.encode(" ".join(TEXTS) * 30)
    assert len(ids) > 2000
    widths: list[int] = []
    real = tok.decode

    def spy(window: list[int], skip_special_tokens: bool = True) -> str:
        widths.append(len(window))
        return real(window, skip_special_tokens)

    monkeypatch.setattr(tok, "decode", spy)
    assert "".join(stream(tok, ids)) == real(ids)
    assert max(widths) <= 8  # never the whole sequence


@pytest.mark.slow
def test_detokenizer_long_invalid_run_is_bounded(tok: Tokenizer) -> None:
    alphabet = byte_level_alphabet()
    cont = tok._tok.token_to_id(alphabet[0x80])  # a lone UTF-8 continuation byte: never valid
    lead = tok._tok.token_to_id(alphabet[0xE4])
    assert cont is not None and lead is not None
    ids = [cont] * 50 + [lead] + tok.encode("ok") + [cont] * 30
    d = IncrementalDetokenizer(tok)
    pieces = [d.push(i) for i in ids]
    # Held text is released in bounded chunks while the run goes on, not only at the end.
    assert sum(1 for p in pieces[:50] if p) >= 3
    pieces.append(d.flush())
    assert "".join(pieces) == tok.decode(ids)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_detokenizer_property_smollm2(tok: Tokenizer, data: st.DataObject) -> None:
    # Half the ids come from the 256 single-byte tokens, so partial and invalid UTF-8 is common.
    alphabet = byte_level_alphabet()
    # (bytes that never occur in UTF-8, like 0xC0 or 0xFF, are not in SmolLM2's vocabulary)
    byte_ids = [i for i in (tok._tok.token_to_id(c) for c in alphabet) if i is not None]
    assert len(byte_ids) > 200
    ids = data.draw(st.lists(
        st.one_of(st.sampled_from(byte_ids), st.integers(0, tok.vocab_size - 1)), max_size=40,
    ))
    skip = data.draw(st.booleans())
    assert "".join(stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(st.one_of(st.text(max_size=8), st.sampled_from(["<s>", "</s>", " ", "hello", " world"])), max_size=8),
       skip=st.booleans())
def test_detokenizer_property_byte_fallback(bf_tok: Tokenizer, pieces: list[str], skip: bool) -> None:
    # Ids a byte-fallback tokenizer produces from text (any unicode, spaces, special tokens):
    # every <0xNN> run is valid UTF-8 (see IncrementalDetokenizer's docstring for the exception).
    ids = [i for p in pieces for i in bf_tok.encode(p)]
    assert "".join(stream(bf_tok, ids, skip)) == bf_tok.decode(ids, skip_special_tokens=skip)


def test_detokenizer_byte_fallback_invalid_run_keeps_streamed_text(bf_tok: Tokenizer) -> None:
    # <0x00> is valid on its own and streamed at once; <0x80> then makes ByteFallback decode the
    # run [00 80] as two U+FFFDs. The stream cannot unsend "\x00": same length, other text.
    ids = [bf_tok._tok.token_to_id("<0x00>"), bf_tok._tok.token_to_id("<0x80>")]
    pieces = stream(bf_tok, ids)
    assert pieces[0] == "\x00"
    assert "".join(pieces) == "\x00\ufffd" and bf_tok.decode(ids) == "\ufffd\ufffd"
