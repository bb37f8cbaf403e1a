"""A model's vocabulary: text to token ids and back, special tokens parsed in markup only.

The engine uses it for prompts and replies; tests load the vocabulary-only
GGUFs of real model families with `load_vocab` to check that, whatever people
type, their text never becomes a control token. Tokenizing only reads the
vocabulary, so it is safe from any thread (llama-server tokenizes in its HTTP
threads too): the chat layer does it off the event loop.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from pathlib import Path

import llama_cpp as L

from bot.engine.backend import ModelError, ModelInfo
from bot.formats.templates import Segment

log = logging.getLogger(__name__)
llama_log = logging.getLogger("llama.cpp")

_log_callback_ref = None  # keeps the ctypes callback alive for the process lifetime
_backend_ready = False


def log_forwarder(logger: logging.Logger, verbose: bool) -> L.llama_log_callback:
    """A C log callback for llama.cpp (and libmtmd) that hands its lines to `logger`, or drops
    them unless `verbose`. The caller keeps a reference to it for as long as C may call it."""
    levels = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level; 5 continues a line

    @L.llama_log_callback
    def forward(level: int, text: bytes, _data: ctypes.c_void_p) -> None:
        if verbose and text:
            logger.log(levels.get(level, logging.DEBUG), "%s", text.decode("utf-8", "replace").rstrip("\n"))

    return forward


def init_backend(verbose: bool) -> None:
    """Route llama.cpp's own log lines to `logging` (or drop them), once per process."""
    global _log_callback_ref, _backend_ready
    _log_callback_ref = log_forwarder(llama_log, verbose)
    L.llama_log_set(_log_callback_ref, ctypes.c_void_p(0))
    if not _backend_ready:
        L.llama_backend_init()
        _backend_ready = True


def check_model_file(path: Path) -> None:
    """Fail early, in one line, on a path that cannot be a GGUF model."""
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelError(f"model path is not a file: {path}")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror}") from None
    if magic != b"GGUF":
        raise ModelError(f"{path} is not a GGUF model file (it does not start with the GGUF signature)")


class Vocab:
    """Tokenizer and detokenizer over a loaded llama.cpp model (weights or vocabulary only)."""

    def __init__(self, model: int, path: Path, *, owned: bool = False) -> None:
        self._model = model
        self._owned = owned  # free the model on close (load_vocab); the engine frees its own
        self._vocab = L.llama_model_get_vocab(model)
        self.n_vocab = L.llama_vocab_n_tokens(self._vocab)
        self.info = describe(model, path)
        self.bos = L.llama_vocab_bos(self._vocab)
        self._piece_cache: dict[int, bytes] = {}
        self._space_prefix = self.text_of(self.tokenize("a", special=False)).startswith(" ")  # SentencePiece
        self._anchor = self.tokenize("\n", special=False)

    def close(self) -> None:
        if self._owned and self._model:
            L.llama_model_free(self._model)
            self._model = None

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        """Text to token ids. `special=True` only for template markup, never for user text."""
        data = text.encode("utf-8")
        if not data:
            return []
        n_max = len(data) + 16
        buf = (L.llama_token * n_max)()
        n = L.llama_tokenize(self._vocab, data, len(data), buf, n_max, False, special)
        if n < 0:
            n_max = -n
            buf = (L.llama_token * n_max)()
            n = L.llama_tokenize(self._vocab, data, len(data), buf, n_max, False, special)
        return list(buf[:n])

    def encode(self, segments: Sequence[Segment]) -> list[int]:
        """A rendered prompt to token ids, parsing special tokens in markup only.

        Segments are tokenized one by one and joined, so text a user typed can
        never turn into a control token. Spaces at a boundary move to the start
        of the next segment, where whole-string tokenization would put them.
        """
        return self.encode_runs([segments])[0]

    def encode_runs(self, runs: Sequence[Sequence[Segment]]) -> list[list[int]]:
        """`encode` for a prompt cut into runs of segments (at its images): the tokens of each
        run, the first with the BOS token, the others tokenized as continuations."""
        markup = "".join(s.text for run in runs for s in run if s.special)
        out: list[list[int]] = []
        for i, run in enumerate(runs):
            texts = [s.text for s in run]
            for j in range(len(texts) - 1):
                stripped = texts[j].rstrip(" ")
                if stripped != texts[j]:
                    texts[j + 1] = texts[j][len(stripped) :] + texts[j + 1]
                    texts[j] = stripped
            tokens: list[int] = []
            for text, seg in zip(texts, run):
                if text:
                    first = i == 0 and not tokens
                    tokens += self._part(text, seg.special, first=first) if seg.special else self._plain(text, markup, first=first)
            out.append(tokens)
        if self.info.add_bos and (not out[0] or out[0][0] != self.bos):
            out[0].insert(0, self.bos)
        return out

    def _part(self, text: str, special: bool, *, first: bool) -> list[int]:
        return self.tokenize(text, special=special) if first else self._continuation(text, special)

    def _plain(self, text: str, markup: str, *, first: bool) -> list[int]:
        """People's text, which must not produce any token the template's markup is made of.

        Parsing special tokens off is not enough: llama.cpp still matches *user-defined*
        tokens in plain text, and some families' markup is made of those (gpt-oss's
        `<|start|>`, `<|channel|>`, `<|message|>`; DeepSeek's `<｜User｜>`). Where such a
        token would come out of people's text and its text is part of the markup, the
        text is cut inside every occurrence and the pieces are tokenized apart, so it
        reads the same but can never form that token."""
        tokens = self._part(text, False, first=first)
        for _ in range(3):  # a cut could, in theory, line up another such token: look again
            forged = {self.special_piece(t).decode("utf-8", "replace") for t in tokens if self.is_user_defined(t)}
            forged = {f for f in forged if len(f) > 1 and f.strip() and f in markup}
            if not forged:
                return tokens
            cuts = sorted({at + 1 for f in forged for at in _occurrences(text, f)})
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
            tokens = [t for i, piece in enumerate(pieces) for t in self._part(piece, False, first=first and i == 0)]
        return tokens

    def _continuation(self, text: str, special: bool) -> list[int]:
        """Tokenize `text` as it would be in the middle of a prompt.

        With a space-prefixing vocabulary, tokenize after an anchor and cut the
        anchor's tokens off, so no spurious space is added at the seam.
        """
        if not self._space_prefix:
            return self.tokenize(text, special=special)
        both = self.tokenize("\n" + text, special=special)
        if both[: len(self._anchor)] == self._anchor:
            return both[len(self._anchor) :]
        return self.tokenize(text, special=special)

    def text_of(self, tokens: Sequence[int]) -> str:
        """Token ids to text; control tokens render as nothing."""
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    def piece(self, token: int) -> bytes:
        """A token's bytes as shown to people (control tokens are empty), cached."""
        piece = self._piece_cache.get(token)
        if piece is None:
            piece = self._piece_cache[token] = token_piece(self._vocab, token, special=False)
        return piece

    def special_piece(self, token: int) -> bytes:
        """A token's bytes with control tokens written out (`<|channel|>`), for formats that need them."""
        return token_piece(self._vocab, token, special=True)

    def is_control(self, token: int) -> bool:
        """True for control tokens (`<|im_start|>`, `</s>`, ...), which no user text may produce."""
        return bool(L.llama_vocab_get_attr(self._vocab, token) & L.LLAMA_TOKEN_ATTR_CONTROL) or self.is_end(token)

    def is_user_defined(self, token: int) -> bool:
        """True for tokens added to the vocabulary as whole strings, which llama.cpp matches even in plain text."""
        return bool(L.llama_vocab_get_attr(self._vocab, token) & L.LLAMA_TOKEN_ATTR_USER_DEFINED)

    def is_end(self, token: int) -> bool:
        """True for end-of-generation tokens (`</s>`, `<|im_end|>`, `<|eot_id|>`, gpt-oss's `<|return|>`)."""
        return bool(L.llama_vocab_is_eog(self._vocab, token))


def _occurrences(text: str, needle: str) -> list[int]:
    found, at = [], text.find(needle)
    while at != -1:
        found.append(at)
        at = text.find(needle, at + 1)
    return found


def token_piece(vocab: int, token: int, *, special: bool) -> bytes:
    buf = ctypes.create_string_buffer(64)
    n = L.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = L.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    return buf.raw[:n]


def describe(model: int, path: Path) -> ModelInfo:
    vocab = L.llama_model_get_vocab(model)

    def special_text(token: int) -> str:
        return token_piece(vocab, token, special=True).decode("utf-8", "replace") if token >= 0 else ""

    desc = ctypes.create_string_buffer(256)
    L.llama_model_desc(model, desc, len(desc))
    template = L.llama_model_chat_template(model, None)
    return ModelInfo(
        path=path,
        description=desc.value.decode("utf-8", "replace"),
        n_ctx_train=L.llama_model_n_ctx_train(model),
        chat_template=template.decode("utf-8", "replace") if template else None,
        bos_token=special_text(L.llama_vocab_bos(vocab)),
        eos_token=special_text(L.llama_vocab_eos(vocab)),
        add_bos=bool(L.llama_vocab_get_add_bos(vocab)),
        size_bytes=L.llama_model_size(model),
    )


def load_vocab(path: Path, *, verbose: bool = False) -> Vocab:
    """A model's vocabulary and metadata without its weights (milliseconds). `close()` it after."""
    check_model_file(path)
    init_backend(verbose)
    params = L.llama_model_default_params()
    params.vocab_only = True
    model = L.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ModelError(f"llama.cpp could not read {path}: the file is truncated, corrupt or of an unsupported architecture")
    return Vocab(model, path, owned=True)


def read_model_info(path: Path, *, verbose: bool = False) -> ModelInfo:
    """Read a model's metadata (chat template, special tokens) without loading its weights."""
    vocab = load_vocab(path, verbose=verbose)
    try:
        return vocab.info
    finally:
        vocab.close()
