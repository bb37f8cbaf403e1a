"""Images for the in-process engine: libmtmd, llama.cpp's multimodal library, beside the model.

A vision model is a text model plus a *projector* GGUF (MMPROJ_PATH) that turns an
image into embeddings in the text model's input space. llama-cpp-python's chat
handlers for it reset the context and always use sequence 0, so they cannot serve
a batched engine; this module calls libmtmd directly, per slot, the way
llama-server does (tools/server, multimodal since PR #12898):

- In a prompt an image is *parts*: the text tokens a model wraps it in
  (`<start_of_image>` ...) and one or more image chunks (several for models that
  tile big images). `layout` asks `mtmd_tokenize` with a placeholder bitmap of the
  image's size, so counting an image's tokens costs no decoding or resizing.
- Each image chunk takes `n_pos` places in the prompt's token list, filled with
  synthetic ids derived from the image's content hash (`image_ids`). The KV cache
  reuse and the disk tier compare token lists, so a prompt's prefix identity
  includes each image's hash: a different image at the same place never reuses a
  state, the same one always can. `n_pos` is libmtmd's count of positions, which
  for M-RoPE models (Qwen2.5-VL) is smaller than the chunk's `n_tokens`.
- Encoding (`mtmd_encode_chunk`, seconds with a real projector on two cores) runs on
  a thread of its own, one image at a time, never on the engine thread; the engine
  then feeds the embeddings into the slot in micro-batches like prompt text
  (`decode_embeddings`), so channels that are generating keep getting tokens.

Images arrive as PNG or JPEG bytes (the chat layer converts WebP, GIF and the rest
when it stores them) and are decoded here with Pillow to raw RGB.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import hashlib
import io
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp as L
import llama_cpp.mtmd_cpp as M
import numpy as np

from bot.engine.backend import ImagePart, ModelError
from bot.engine.vocab import log_forwarder
from bot.formats.templates import Image

log = logging.getLogger(__name__)
mtmd_log = logging.getLogger("llama.cpp.mtmd")

MEDIA_MARKER = f"<__media_{secrets.token_hex(8)}__>"
"""Where an image goes in a rendered prompt. Random per process, as llama-server's own
marker is: nobody can type it, so no user text can pretend to be an image."""

PLACEHOLDER = "[image]"
"""What a model reads where an image was that it cannot be shown (no projector, or no room)."""

EMBEDDING_CACHE_BYTES = 64 << 20
"""Encoded images kept in RAM: the same picture in several channels, or a reply that must
evaluate it again, is not encoded twice while it is recent."""

_log_callback_ref = None


@dataclass(frozen=True)
class ChunkSize:
    """An image chunk in a layout: embeddings (KV cells) and positions it takes."""

    n_tokens: int
    n_pos: int


@dataclass(frozen=True)
class Encoded:
    """One image chunk's embeddings and where they go.

    Positions are libmtmd's decoder positions for a chunk starting at 0 (`pos`,
    section-major: [n_pos_per_embd, n_tokens]) and how each section moves with the
    chunk's real start (`step`: 1 or 0 per section)."""

    embd: np.ndarray  # float32 [n_tokens, n_embd]
    pos: np.ndarray  # int32 [sections, n_tokens]
    step: np.ndarray  # int32 [sections]

    @property
    def nbytes(self) -> int:
        return int(self.embd.nbytes + self.pos.nbytes)


def image_ids(digest: str, index: int, n_pos: int) -> list[int]:
    """The synthetic token ids an image chunk takes in a prompt's token list: negative (never
    a vocabulary id), derived from its content hash, one per position."""
    ids = []
    for j in range(n_pos):
        h = hashlib.blake2b(f"{digest}:{index}:{j}".encode(), digest_size=4).digest()
        ids.append(-2 - (int.from_bytes(h, "little") & 0x3FFFFFFF))
    return ids


def rgb_of(data: bytes) -> tuple[int, int, bytes]:
    """Decode stored image bytes to raw RGB (alpha composited on white): (width, height, pixels)."""
    from PIL import Image as PILImage

    with PILImage.open(io.BytesIO(data)) as img:
        img.seek(0)
        if img.mode in ("RGBA", "LA", "P", "PA") or "transparency" in img.info:
            rgba = img.convert("RGBA")
            flat = PILImage.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))
        else:
            flat = img.convert("RGB")
        return flat.width, flat.height, flat.tobytes()


class Vision:
    """A loaded projector: image layouts, and an encoder thread. Create with `Vision.load`."""

    def __init__(self, ctx: int, path: Path, identity: str, n_embd: int) -> None:
        self._ctx = ctx
        self.path = path
        self.identity = identity  # of the projector file, for the disk tier's identity
        self.n_embd = n_embd
        self.mrope = bool(M.mtmd_decode_use_mrope(ctx))
        self.non_causal = bool(M.mtmd_decode_use_non_causal(ctx, None))
        self.sections = 4 if self.mrope else 1
        self._layouts: dict[tuple[int, int], list[list[int] | ChunkSize]] = {}
        self._encoder = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtmd-encode")
        self._lock = threading.Lock()
        self._running: dict[str, concurrent.futures.Future[list[Encoded]]] = {}
        self._cache: collections.OrderedDict[str, list[Encoded]] = collections.OrderedDict()
        self._cache_bytes = 0
        # counters (read by tests and the benchmark)
        self.images_encoded = 0
        self.encode_seconds = 0.0
        self.encodes: collections.deque[tuple[float, float]] = collections.deque(maxlen=16)  # (start, end) of the latest

    @classmethod
    def load(cls, path: Path, model: int, *, n_threads: int, verbose: bool, identity: str) -> Vision:
        """Load a projector for `model`; ModelError (one line) when it cannot be used."""
        global _log_callback_ref
        if not path.is_file():
            raise ModelError(f"MMPROJ_PATH {path} is not a file")
        _log_callback_ref = log_forwarder(mtmd_log, verbose)
        M.mtmd_log_set(_log_callback_ref, ctypes.c_void_p(0))
        M.mtmd_helper_log_set(_log_callback_ref, ctypes.c_void_p(0))
        params = M.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.n_threads = n_threads
        params.warmup = True  # the first user does not pay for the encoder's graph setup
        ctx = M.mtmd_init_from_file(str(path).encode(), model, params)
        if not ctx:
            raise ModelError(
                f"libmtmd could not load the projector {path}: it is not an mmproj GGUF, or not one made for this model"
                " (its output size must match the model's; LLAMA_LOG=1 shows why)"
            )
        if not M.mtmd_support_vision(ctx):
            M.mtmd_free(ctx)
            raise ModelError(f"the projector {path} has no vision encoder (an audio-only mmproj?)")
        return cls(ctx, path, identity, L.llama_model_n_embd_inp(model))

    # --- prompts ----------------------------------------------------------------------------

    def layout(self, width: int, height: int) -> list[list[int] | ChunkSize]:
        """What an image of this size becomes in a prompt: text tokens (lists) and image chunks,
        as `mtmd_tokenize` lays them out for a lone marker. Cached per size (no pixels needed)."""
        key = (width, height)
        found = self._layouts.get(key)
        if found is None:
            found = self._tokenize(width, height, None, lambda chunk, kind: ChunkSize(
                M.mtmd_input_chunk_get_n_tokens(chunk), M.mtmd_input_chunk_get_n_pos(chunk)))
            if len(self._layouts) > 256:
                self._layouts.clear()
            self._layouts[key] = found
        return found

    def _tokenize(self, width: int, height: int, rgb: bytes | None, image_chunk: Callable[[int, int], object]) -> list:
        """Run mtmd_tokenize on one marker and one bitmap (None: a placeholder of that size);
        text chunks become token lists, image chunks whatever `image_chunk` makes of them."""
        buf = (ctypes.c_uint8 * len(rgb)).from_buffer_copy(rgb) if rgb is not None else None
        bitmap = M.mtmd_bitmap_init(width, height, buf)
        if not bitmap:
            raise ValueError(f"libmtmd refused a {width}x{height} image")
        chunks = M.mtmd_input_chunks_init()
        try:
            marker = M.mtmd_default_marker()
            text = M.mtmd_input_text()
            text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
            bitmaps = (M.mtmd_bitmap_p_ctypes * 1)(bitmap)
            rc = M.mtmd_tokenize(self._ctx, chunks, ctypes.byref(text), bitmaps, 1)
            if rc != 0:
                raise ValueError(f"libmtmd could not prepare a {width}x{height} image (code {rc})")
            out: list = []
            for i in range(M.mtmd_input_chunks_size(chunks)):
                chunk = M.mtmd_input_chunks_get(chunks, i)
                kind = M.mtmd_input_chunk_get_type(chunk)
                if kind == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t(0)
                    tokens = M.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    if n.value:
                        out.append([tokens[j] for j in range(n.value)])
                elif kind == M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    out.append(image_chunk(chunk, kind))
                else:
                    raise ValueError("libmtmd made a chunk that is not text or an image")
            return out
        finally:
            M.mtmd_input_chunks_free(chunks)
            M.mtmd_bitmap_free(bitmap)

    # --- encoding (its own thread, one image at a time) -------------------------------------

    def encode(self, image: Image) -> concurrent.futures.Future[list[Encoded]]:
        """The embeddings of each image chunk of `image`, encoded on the encoder thread (or found
        in the cache, or shared with an encode of the same picture already under way)."""
        with self._lock:
            cached = self._cache.get(image.digest)
            if cached is not None:
                self._cache.move_to_end(image.digest)
                done: concurrent.futures.Future[list[Encoded]] = concurrent.futures.Future()
                done.set_result(cached)
                return done
            running = self._running.get(image.digest)
            if running is not None:
                return running
            future = self._encoder.submit(self._encode, image)
            self._running[image.digest] = future
            return future

    def _encode(self, image: Image) -> list[Encoded]:
        began = time.perf_counter()
        try:
            width, height, rgb = rgb_of(image.data)
            encoded = self._tokenize(width, height, rgb, lambda chunk, kind: self._encode_chunk(chunk))
            parts = [e for e in encoded if isinstance(e, Encoded)]
        finally:
            with self._lock:
                self._running.pop(image.digest, None)
                self.encodes.append((began, time.perf_counter()))
        with self._lock:
            self._cache[image.digest] = parts
            self._cache_bytes += sum(p.nbytes for p in parts)
            while self._cache_bytes > EMBEDDING_CACHE_BYTES and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= sum(p.nbytes for p in old)
            self.images_encoded += 1
            self.encode_seconds += time.perf_counter() - began
        log.debug("encoded image %s (%dx%d) in %.3f s", image.digest[:12], width, height, time.perf_counter() - began)
        return parts

    def _encode_chunk(self, chunk: int) -> Encoded:
        if M.mtmd_encode_chunk(self._ctx, chunk) != 0:
            raise RuntimeError("libmtmd failed to encode an image")
        n = M.mtmd_input_chunk_get_n_tokens(chunk)
        out = M.mtmd_get_output_embd(self._ctx)
        embd = np.ctypeslib.as_array(out, shape=(n, self.n_embd)).copy()
        tokens = M.mtmd_input_chunk_get_tokens_image(chunk)
        at0 = [M.mtmd_image_tokens_get_decoder_pos(tokens, 0, i) for i in range(n)]
        at1 = M.mtmd_image_tokens_get_decoder_pos(tokens, 1, 0)
        if self.mrope:  # section-major, as mtmd-helper's set_position_mrope_2d: t, y, x, z
            pos = np.array([[p.t for p in at0], [p.y for p in at0], [p.x for p in at0], [p.z for p in at0]], dtype=np.int32)
            step = np.array([at1.t - at0[0].t, at1.y - at0[0].y, at1.x - at0[0].x, at1.z - at0[0].z], dtype=np.int32)
        else:
            pos = np.array([[p.t for p in at0]], dtype=np.int32)
            step = np.array([at1.t - at0[0].t], dtype=np.int32)
        return Encoded(embd, pos, step)

    def close(self) -> None:
        """Stop the encoder thread (after the image it is encoding) and free libmtmd."""
        self._encoder.shutdown(wait=True, cancel_futures=True)
        if self._ctx:
            M.mtmd_free(self._ctx)
            self._ctx = 0


@dataclass
class ImageFeed:
    """A request's images on their way into its slot: where they are in its prompt, their
    encodings, and how much of the image at the slot's head is already decoded."""

    vision: Vision
    parts: dict[int, ImagePart]  # by start
    extra_cells: int = 0  # KV cells the images take beyond their positions (M-RoPE models)
    done: int = 0  # embeddings of the image at the head already in the slot's KV cells
    _encodes: dict[str, concurrent.futures.Future[list[Encoded]]] = field(default_factory=dict)

    @classmethod
    def of(cls, vision: Vision, parts: Sequence[ImagePart]) -> ImageFeed:
        return cls(vision, {p.start: p for p in parts}, sum(p.n_tokens - p.n_pos for p in parts))

    def text_run(self, pos: int, pending: int) -> int:
        """How many prompt tokens from position `pos` come before the next image."""
        nxt = min((s for s in self.parts if s >= pos), default=None)
        return pending if nxt is None else min(pending, nxt - pos)

    def boundary(self, keep: int) -> int:
        """A reusable prefix length moved back to the start of an image it would cut."""
        for part in self.parts.values():
            if part.start < keep < part.start + part.n_pos:
                return part.start
        return keep

    def request(self, pos: int, on_done: Callable[[], None]) -> None:
        """Ask the encoder for every image still to be decoded (from position `pos` on)."""
        for start, part in sorted(self.parts.items()):
            if start >= pos and part.image.digest not in self._encodes:
                future = self.vision.encode(part.image)
                self._encodes[part.image.digest] = future
                future.add_done_callback(lambda _f: on_done())

    def ready(self, part: ImagePart) -> Encoded | None:
        """The part's embeddings once encoded (None: not yet). Raises what the encode raised."""
        future = self._encodes.get(part.image.digest)
        if future is None or not future.done():
            return None
        encoded = future.result()
        if part.index >= len(encoded) or encoded[part.index].embd.shape[0] != part.n_tokens:
            raise RuntimeError("an image encoded to another shape than its layout said")
        return encoded[part.index]


def decode_embeddings(ctx: int, encoded: Encoded, first: int, count: int, pos_0: int, seq: int, *, non_causal: bool) -> int:
    """Decode embeddings [first, first + count) of an image chunk starting at position `pos_0`
    into sequence `seq`; returns llama_decode's code (2: aborted by the abort callback)."""
    sections = encoded.pos.shape[0]
    embd = np.ascontiguousarray(encoded.embd[first : first + count], dtype=np.float32)
    pos = (encoded.pos[:, first : first + count] + encoded.step[:, None] * pos_0).astype(np.int32)
    pos_flat = np.ascontiguousarray(pos.reshape(sections * count))
    seq_ids = (ctypes.c_int32 * 1)(seq)
    seq_ptrs = (ctypes.POINTER(ctypes.c_int32) * count)(*([ctypes.cast(seq_ids, ctypes.POINTER(ctypes.c_int32))] * count))
    n_seq = (ctypes.c_int32 * count)(*([1] * count))
    logits = (ctypes.c_int8 * count)()
    batch = L.llama_batch()
    batch.n_tokens = count
    batch.token = ctypes.POINTER(L.llama_token)()
    batch.embd = embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    batch.pos = pos_flat.ctypes.data_as(ctypes.POINTER(L.llama_pos))
    batch.n_seq_id = n_seq
    batch.seq_id = seq_ptrs
    batch.logits = logits
    if non_causal:
        L.llama_set_causal_attn(ctx, False)
    try:
        return int(L.llama_decode(ctx, batch))
    finally:
        if non_causal:
            L.llama_set_causal_attn(ctx, True)
