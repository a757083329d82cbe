"""Tokenizer (HF `tokenizer.json`), the model's chat template rendered exactly as transformers
renders it (nothing added beyond what it writes), and incremental detokenising that never emits
half a character and whose deltas add up to the one-shot decode."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

logger = logging.getLogger(__name__)

CHAT_ROLES: frozenset[str] = frozenset({"system", "user", "assistant", "tool"})
_REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole character


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's character for each byte (GPT-2's map), inverted: char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + n)
    return {c: b for b, c in chars.items()}


_BYTE_OF = _byte_level_alphabet()


class ChatTemplateError(ValueError):
    """The chat template could not be rendered (it called raise_exception, or is broken)."""


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (training-mask markers): renders the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes <, >, & and '; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template as transformers does: immutable sandbox, trim/lstrip blocks, loop
    controls, raise_exception, strftime_now and a plain-JSON `tojson`."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _content_text(i: int, content: Any) -> str:
    """A message's content as the template sees it: a string, or a list of text parts joined
    by newlines (as vLLM joins them); any other part is refused by its index and type."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"messages[{i}].content must be a string or a list of text parts, "
                         f"got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            what = repr(kind) if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"messages[{i}].content[{j}]: only text parts are supported, got {what}")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"messages[{i}].content[{j}].text must be a string")
        texts.append(part["text"])
    return "\n".join(texts)


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """A non-empty list of dicts with `role` in CHAT_ROLES (or "developer", which becomes
    "system") and `content` a string or text parts (joined), else ValueError naming the index and
    field at fault; returns the dicts (extra keys such as `name` kept)."""
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages must not be empty")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object, got {type(m).__name__}")
        if "role" not in m:
            raise ValueError(f"messages[{i}] has no 'role'")
        role = m["role"]
        if role == "developer":  # what newer OpenAI clients send for "system"
            role = "system"
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise ValueError(
                f"messages[{i}].role must be one of {sorted(CHAT_ROLES)}, got {role!r}"
            )
        if "content" not in m:
            raise ValueError(f"messages[{i}] has no 'content'")
        if "name" in m and not isinstance(m["name"], str):
            raise ValueError(f"messages[{i}].name must be a string, got {type(m['name']).__name__}")
        out.append({**m, "role": role, "content": _content_text(i, m["content"])})
    return out


def _token_content(value: Any) -> str | None:
    """tokenizer_config stores special tokens as "str" or {"content": "str", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


class Tokenizer:
    """A HF fast tokenizer plus the model's chat template and stop tokens; safe to share."""

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        extra_stop_ids: Iterable[int] = (),
        special_tokens_map: dict[str, Any] | None = None,
    ) -> None:
        self._tok = tokenizer
        self.chat_template = chat_template
        self._template = compile_chat_template(chat_template) if chat_template else None
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = self._id_of(bos_token)
        self.eos_token_id = self._id_of(eos_token)
        stops = set(extra_stop_ids)
        if self.eos_token_id is not None:
            stops.add(self.eos_token_id)
        self.stop_token_ids: frozenset[int] = frozenset(stops)
        # Variables transformers hands every template (its special_tokens_map).
        self._template_vars: dict[str, Any] = dict(special_tokens_map or {})
        self._template_vars.update(bos_token=bos_token, eos_token=eos_token)
        self._byte_level = type(tokenizer.decoder).__name__ == "ByteLevel"
        self._bytes: dict[int, bytes] = {}

    def _id_of(self, token: str | None) -> int | None:
        if token is None:
            return None
        idx = self._tok.token_to_id(token)
        if idx is None:
            raise ValueError(f"special token {token!r} is not in the vocabulary")
        return idx

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json (+ chat_template.jinja) and generation_config.json.

        stop_token_ids = the tokenizer's eos token + every eos_token_id in generation_config.json
        (which may be an int or a list). Raises FileNotFoundError when tokenizer.json is absent.
        """
        model_dir = Path(model_dir)
        tok_path = model_dir / "tokenizer.json"
        if not tok_path.is_file():
            raise FileNotFoundError(f"{tok_path} not found (only fast tokenizers are supported)")
        tok = _HFTokenizer.from_file(str(tok_path))
        cfg_path = model_dir / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default")
        jinja_path = model_dir / "chat_template.jinja"  # transformers >= 4.5x saves it here
        if template is None and jinja_path.is_file():
            template = jinja_path.read_text()
        gen_path = model_dir / "generation_config.json"
        gen: dict[str, Any] = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        special_map: dict[str, Any] = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                    "mask_token"):
            content = _token_content(cfg.get(key))
            if content is not None:
                special_map[key] = content
        extra = cfg.get("additional_special_tokens")
        if extra:
            special_map["additional_special_tokens"] = [_token_content(t) for t in extra]
        return cls(
            tok,
            chat_template=template,
            bos_token=special_map.get("bos_token"),
            eos_token=special_map.get("eos_token"),
            extra_stop_ids=_as_id_list(gen.get("eos_token_id")),
            special_tokens_map=special_map,
        )

    @property
    def vocab_size(self) -> int:
        """Token ids the tokenizer can produce (may be below the model's padded vocab_size)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added. Special-token strings in `text` map to their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; bytes that do not form whole characters decode to U+FFFD."""
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for: exact for byte-level BPE, also for part of a character."""
        got = self._bytes.get(token_id)
        if got is None:
            piece = self._tok.id_to_token(token_id) or ""
            if self._byte_level and all(c in _BYTE_OF for c in piece):
                got = bytes(_BYTE_OF[c] for c in piece)
            else:
                got = self.decode([token_id], skip_special_tokens=False).encode()
            self._bytes[token_id] = got
        return got

    def token_text(self, token_id: int) -> str:
        """One token as text (U+FFFD for a part of a character), as logprobs name it."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render `messages` as transformers would: ValueError for bad messages or no template,
        ChatTemplateError when the template refuses."""
        if self._template is None:
            raise ValueError("this model has no chat template; send a plain completion prompt")
        msgs = validate_messages(messages)
        try:
            return self._template.render(
                messages=msgs,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self._template_vars,
            )
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"chat template rejected the messages: {e}") from e

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids for a chat: encode(apply_chat_template(messages))."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))


class IncrementalDetokenizer:
    """Token ids in, text deltas out: `push(id)` returns the text made final by this token,
    `flush()` what is held back; together they equal the one-shot decode. Each push decodes a
    short window (left context + new tokens), cut after `max_hold` tokens stuck on U+FFFD."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, max_hold: int = 8) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._max_hold = max_hold
        self._ids: list[int] = []
        self._ctx = 0  # window start: left context, already emitted
        self._boundary = 0  # ids[:boundary] are emitted; boundary is a character boundary
        self._ctx_text = ""  # decode(ids[ctx:boundary])
        self._out: list[str] = []

    def _decode(self, start: int, end: int) -> str:
        return self._tok.decode(self._ids[start:end], skip_special_tokens=self._skip)

    def _advance(self, new_boundary: int, window_text: str) -> str:
        """Emit window_text (= decode(ids[ctx:new_boundary])) beyond what was emitted already."""
        if window_text.startswith(self._ctx_text):
            delta = window_text[len(self._ctx_text):]
        else:
            # The decoder rewrote earlier text (ByteFallback on an invalid byte): decode all once.
            full = self._decode(0, new_boundary)
            emitted = self.text
            if not full.startswith(emitted):
                logger.debug("detokenizer: decoder rewrote streamed text %r -> %r", emitted[-8:], full[-8:])
            delta = full[len(emitted):]
        # The next window starts at the old boundary, unless the tokens from there decode to
        # nothing (skipped special tokens): a window must start with visible text, or a decoder
        # that strips the window's leading space (Metaspace) would strip a space that the
        # one-shot decode keeps.
        step_text = self._decode(self._boundary, new_boundary)
        if step_text:
            self._ctx, self._ctx_text = self._boundary, step_text
        else:
            self._ctx_text = self._decode(self._ctx, new_boundary)
        self._boundary = new_boundary
        self._out.append(delta)
        return delta

    def push(self, token_id: int) -> str:
        """Add one generated id; return the newly completed text (possibly "")."""
        self._ids.append(int(token_id))
        n = len(self._ids)
        text = self._decode(self._ctx, n)
        if not text.endswith(_REPLACEMENT):
            return self._advance(n, text)
        if n - self._boundary > self._max_hold:
            return self._cut_long_hold(text)
        return ""

    def _cut_long_hold(self, text: str) -> str:
        # A UTF-8 character is at most 4 bytes and every token is at least one byte, so with 3
        # tokens after a cut point the decoder's view of the bytes before it is final. The cut is
        # safe when decoding the two sides separately gives the same text as decoding the whole.
        n = len(self._ids)
        for k in range(n - 3, self._boundary, -1):
            head = self._decode(self._ctx, k)
            if head + self._decode(k, n) == text and head.startswith(self._ctx_text):
                return self._advance(k, head)
        return ""

    def flush(self) -> str:
        """Emit everything still held back (call at end of stream; later pushes may follow)."""
        n = len(self._ids)
        if self._boundary == n:
            return ""
        return self._advance(n, self._decode(self._ctx, n))

    @property
    def text(self) -> str:
        """All text emitted so far (pushes and flushes)."""
        return "".join(self._out)

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)
