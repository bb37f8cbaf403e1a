"""Vision projectors (mmproj GGUFs) with fixed-seed random weights, for tests and the bench.

No real vision model can be downloaded here, so these are made: LLaVA-style `mlp`
projectors, the kind with the fewest tensors (patch and position embeddings, the
encoder blocks, and the two-layer MLP `mm.0` / `mm.2` into the text model's
embedding space). The "descriptions" a text model writes from their output are
nonsense, but the pipeline's properties are testable: the same image gives the
same embeddings, two different images give different ones.

Every key carries the exact GGUF value type clip.cpp reads (tools/mtmd/clip.cpp,
`load_hparams`): an int32 where it reads a uint32 aborts the whole process in an
assert, it is not an error. Other facts the loader imposes: `image_mean` and
`image_std` need three values; the FFN size must differ from the hidden size
(the loader swaps the up and down weights of old LLaVA files when they match);
the LLaVA graph runs the blocks up to the second-to-last (so at least two); the
output size is read from `mm.2.weight`.

`tiny()`: 32 px images, patch 8, 16 image tokens, milliseconds to encode
(committed nowhere: written to a temporary folder per test session).
`real_size()`: a 224 px, 12-layer, 768-wide encoder (patch 16, 196 image tokens),
about the size of CLIP ViT-B/16, for the bench and the token-gap measurement;
generated on demand into a cache folder (about 170 MB).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SMOLLM2_EMBD = 576  # the bundled SmolLM2-135M's embedding size: the projector's output size


@dataclass(frozen=True)
class Shape:
    image_size: int
    patch_size: int
    n_embd: int
    n_ff: int
    n_head: int
    n_layer: int
    proj_hidden: int
    out_embd: int = SMOLLM2_EMBD
    f16: bool = False  # weight matrices in F16 (halves the real-size file)

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


TINY = Shape(image_size=32, patch_size=8, n_embd=64, n_ff=96, n_head=4, n_layer=2, proj_hidden=128)
REAL = Shape(image_size=224, patch_size=16, n_embd=768, n_ff=3072, n_head=12, n_layer=12, proj_hidden=SMOLLM2_EMBD, f16=True)


def write_projector(path: Path, shape: Shape, *, seed: int = 1234) -> Path:
    """Write an mmproj GGUF of `shape` with random weights from `seed` (same seed: same file)."""
    import gguf  # the test extra; the bot itself never writes GGUF files

    rng = np.random.default_rng(seed)
    weight_type = np.float16 if shape.f16 else np.float32

    def rand(*dims: int, scale: float = 0.02, matrix: bool = True) -> np.ndarray:
        values = rng.standard_normal(dims, dtype=np.float32) * scale
        return values.astype(weight_type) if matrix else values

    e, ff = shape.n_embd, shape.n_ff
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "clip")
    writer.add_string("general.name", f"random llava mlp projector {shape.image_size}px x{shape.n_layer}")
    writer.add_uint32("general.file_type", 1 if shape.f16 else 0)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_audio_encoder", False)
    writer.add_bool("clip.use_gelu", True)
    writer.add_uint32("clip.vision.image_size", shape.image_size)
    writer.add_uint32("clip.vision.patch_size", shape.patch_size)
    writer.add_uint32("clip.vision.embedding_length", e)
    writer.add_uint32("clip.vision.feed_forward_length", ff)
    writer.add_uint32("clip.vision.block_count", shape.n_layer)
    writer.add_uint32("clip.vision.projection_dim", shape.out_embd)
    writer.add_uint32("clip.vision.attention.head_count", shape.n_head)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    writer.add_array("clip.vision.image_mean", [0.48145466, 0.4578275, 0.40821073])  # floats: written as FLOAT32
    writer.add_array("clip.vision.image_std", [0.26862954, 0.26130258, 0.27577711])

    # numpy shapes are ggml's reversed: ggml [patch, patch, 3, n_embd] is (n_embd, 3, patch, patch)
    p = shape.patch_size
    writer.add_tensor("v.patch_embd.weight", rand(e, 3, p, p, scale=0.1))
    writer.add_tensor("v.patch_embd.bias", rand(e, matrix=False))
    writer.add_tensor("v.position_embd.weight", rand(shape.n_patches, e, scale=0.1, matrix=False))
    writer.add_tensor("v.pre_ln.weight", np.ones(e, dtype=np.float32))
    writer.add_tensor("v.pre_ln.bias", np.zeros(e, dtype=np.float32))
    for i in range(shape.n_layer):
        block = f"v.blk.{i}"
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            writer.add_tensor(f"{block}.{name}.weight", rand(e, e))
            writer.add_tensor(f"{block}.{name}.bias", rand(e, matrix=False))
        for name in ("ln1", "ln2"):
            writer.add_tensor(f"{block}.{name}.weight", np.ones(e, dtype=np.float32) + rand(e, scale=0.05, matrix=False))
            writer.add_tensor(f"{block}.{name}.bias", rand(e, matrix=False))
        writer.add_tensor(f"{block}.ffn_up.weight", rand(ff, e))  # ggml [e, ff]: e -> ff
        writer.add_tensor(f"{block}.ffn_up.bias", rand(ff, matrix=False))
        writer.add_tensor(f"{block}.ffn_down.weight", rand(e, ff))  # ggml [ff, e]: ff -> e
        writer.add_tensor(f"{block}.ffn_down.bias", rand(e, matrix=False))
    writer.add_tensor("mm.0.weight", rand(shape.proj_hidden, e, scale=0.5))
    writer.add_tensor("mm.0.bias", rand(shape.proj_hidden, matrix=False))
    writer.add_tensor("mm.2.weight", rand(shape.out_embd, shape.proj_hidden, scale=0.5))
    writer.add_tensor("mm.2.bias", rand(shape.out_embd, matrix=False))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path


def tiny(folder: Path, *, seed: int = 1234) -> Path:
    """The tiny projector (16 image tokens of 576), written into `folder` if not there yet."""
    path = folder / f"tiny-mmproj-{seed}.gguf"
    return path if path.is_file() else write_projector(path, TINY, seed=seed)


def cache_folder() -> Path:
    """Where generated projectors are kept between runs (LLAMABOT_CACHE, else ~/.cache/llamabot)."""
    folder = Path(os.environ.get("LLAMABOT_CACHE") or Path.home() / ".cache" / "llamabot")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def real_size(folder: Path | None = None, *, seed: int = 4321) -> Path:
    """The real-size projector (224 px, 12 layers, 768 wide), generated once into the cache folder."""
    path = (folder or cache_folder()) / f"random-mmproj-224px-12x768-{seed}.gguf"
    return path if path.is_file() else write_projector(path, REAL, seed=seed)
