"""Model trees with MinerU's true architectures and random weights, for tests.

:func:`write_random_models` writes the ``MinerU-4_models_torch`` tree that MinerU 4.0.x
reads with ``model.source: local`` and ``model.small_backend: torch``: the layout and
formula models keep their real architectures and sizes (so memory behaves as in
production), while their weights are random. Untrained networks have two traps, both
handled here by scripting a few weights:

* A random layout detector picks its 300 queries by position, not content, and labels
  nearly all of them alike, so the lazily loaded formula and table models would never
  run. Its decoder is scripted instead (see :mod:`._layout`): the first layer
  turns each query's anchor position into a region indicator, the later residual
  branches are zeroed, and the class and box heads map regions to the fixed page plan
  in ``_layout.LAYOUT_PLAN`` (text, a display and an inline formula, a table). Backbone,
  encoder and every attention layer still run at full size, with the released
  configuration (53.6 million parameters); only the answer no longer depends on the
  page.
* A random formula decoder never emits end-of-sequence and runs to its 2560-token limit.
  Its final layer norm and the ``</s>`` row of its output layer are scripted so the
  first token is ``</s>``.

The three table models are ONNX files that MinerU runs with onnxruntime. The stand-ins
are tiny networks with the real input and output contracts (see
:mod:`._tables`), written as ONNX protobuf directly:
``torch.onnx.export`` needs the ``onnx`` package, which ``mineru[torch]`` does not
install.

:func:`write_random_vlm` writes a tiny ``Qwen2VLForConditionalGeneration`` with a
byte-level tokenizer that transformers and MinerU's ``transformers`` VLM engine load
offline.

Nothing here is imported at ``import mineru_vram``; torch and transformers are imported
inside the functions, and MinerU's model code and data files are reached only through
:mod:`mineru_vram._adapter` (:func:`~mineru_vram._adapter.layout_label_constants`,
:func:`~mineru_vram._adapter.pytorchocr_model`,
:func:`~mineru_vram._adapter.pytorchocr_resources`). Building never imports
``mineru.config`` (which reads the environment and may write files at import).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from mineru_vram import _adapter
from mineru_vram._files import exclusive

from . import _layout, _tables

if TYPE_CHECKING:
    import numpy as np

__all__ = ["write_random_models", "write_random_vlm"]

#: Bump when the tree's content changes, so existing caches are rebuilt.
_FORMAT_VERSION: Final = 1
_MANIFEST_NAME: Final = ".mineru_vram_random_models.json"
_VLM_MANIFEST_NAME: Final = ".mineru_vram_random_vlm.json"
_LOCK_NAME: Final = ".mineru_vram_random_models.lock"
_STAGING_PREFIX: Final = ".mineru_vram_build-"
_REPO_NAME: Final = "MinerU-4_models_torch"
#: MinerU's marker for a complete model directory (mineru/model/download.py).
_COMPLETE_MARKER: Final = ".mineru_complete"

_LAYOUT_DIR: Final = "Layout/PP-DocLayoutV2"
_OCR_DIR: Final = "OCR/paddleocr"
_MFR_DIR: Final = "MFR/pp_formulanet_plus_m"
_MFR_NAME: Final = "PP-FormulaNet_plus-M"
_TABLE_DIR: Final = "Table"


#: How long a caller waits for another process that is building the same tree. A build
#: takes 20-30 s on a workstation and a few minutes on two busy cores.
BUILD_LOCK_TIMEOUT: Final = 1800.0


def write_random_models(path: str | os.PathLike[str], *, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a MinerU 4 small-model tree with true architectures and random weights.

    Point MinerU at the result with ``model.base_dir = path``, ``model.source = "local"``
    and ``model.small_backend = "torch"``. The tree holds, under
    ``path/MinerU-4_models_torch/``, the PP-DocLayoutV2 layout model, the PP-OCRv6 text
    detector and recognizer, the PP-OCRv4 seal detector, PP-FormulaNet_plus-M and three
    ONNX table stand-ins (about 880 MB in all).

    The call is idempotent: a complete tree built with the same ``seed`` (and the same
    format and MinerU version) is returned at once. The tree is built in a temporary
    folder under ``path`` and renamed into place; a manifest, written last and
    atomically, marks it complete, so a crash never leaves a tree that looks finished.
    Concurrent callers (threads, processes, pytest-xdist workers) are serialised with
    a lock file in ``path``. The content is deterministic for a given seed.

    Args:
        path: Folder to use as MinerU's ``model.base_dir``; created if missing.
        seed: Seed for the random weights.
        overwrite: Rebuild even if a complete tree with this seed exists.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: If ``seed`` is negative.
        TimeoutError: If another process held the build lock for :data:`BUILD_LOCK_TIMEOUT` seconds.
        OSError: If the tree cannot be written.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    root = Path(path)
    expected = _manifest_header(seed)
    if not overwrite and _manifest_matches(root / _MANIFEST_NAME, expected, root):
        return root
    root.mkdir(parents=True, exist_ok=True)
    with exclusive(root / _LOCK_NAME, timeout=BUILD_LOCK_TIMEOUT):
        if not overwrite and _manifest_matches(root / _MANIFEST_NAME, expected, root):
            return root
        # From here on the tree may change: without a manifest it reads as incomplete.
        (root / _MANIFEST_NAME).unlink(missing_ok=True)
        for stale in root.glob(_STAGING_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=root))
        try:
            built = staging / _REPO_NAME
            _build_model_tree(built, seed)
            files = _list_files(built, staging)  # same relative paths once renamed into root
            target = root / _REPO_NAME
            if target.exists():
                os.replace(target, staging / "previous")
            os.replace(built, target)
            _write_json_atomic(root / _MANIFEST_NAME, {**expected, "files": files})
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return root


def write_random_vlm(path: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write a tiny random ``Qwen2VLForConditionalGeneration`` that loads offline.

    The folder holds ``config.json``, ``model.safetensors``, ``generation_config.json``,
    a byte-level BPE tokenizer (``tokenizer.json``, built with ``tokenizers``, no
    download), ``tokenizer_config.json`` with a Qwen2-VL chat template,
    ``preprocessor_config.json`` and ``processor_config.json``. It loads with
    ``AutoProcessor.from_pretrained`` and
    ``Qwen2VLForConditionalGeneration.from_pretrained``, and through MinerU's
    ``transformers`` engine (``ModelSingleton().get_model("transformers",
    model_path=..., server_url=None)``). The model has two text layers of width 64, one
    vision block and a 270-token vocabulary (about 180,000 parameters). Its final norm
    is zeroed so greedy decoding ends at once with ``<|endoftext|>`` (listed as an end
    token, as in Qwen2-VL's own generation config): a random model would otherwise
    generate up to 8192 tokens per MinerU block.

    Like :func:`write_random_models` it is idempotent per seed and is built beside
    ``path`` and renamed into place.

    Args:
        path: The model folder to create (its parent is created if missing).
        seed: Seed for the random weights.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: If ``seed`` is negative.
        TimeoutError: If another process held the build lock for :data:`BUILD_LOCK_TIMEOUT` seconds.
        OSError: If the folder cannot be written.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    target = Path(path)
    expected = {
        "format": _FORMAT_VERSION,
        "kind": "qwen2-vl-tiny",
        "seed": seed,
        "transformers": _version("transformers"),
    }
    if _manifest_matches(target / _VLM_MANIFEST_NAME, expected, target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(target.parent / f".{target.name}.lock", timeout=BUILD_LOCK_TIMEOUT):
        if _manifest_matches(target / _VLM_MANIFEST_NAME, expected, target):
            return target
        prefix = f".{target.name}{_STAGING_PREFIX}"
        for stale in target.parent.glob(prefix + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        try:
            built = staging / "model"
            _build_tiny_vlm(built, seed)
            # Written inside the folder before the rename: the rename is what publishes it.
            _write_json_atomic(built / _VLM_MANIFEST_NAME, {**expected, "files": _list_files(built, built)})
            if target.exists():
                os.replace(target, staging / "previous")
            os.replace(built, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- manifest


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _manifest_header(seed: int) -> dict[str, Any]:
    return {"format": _FORMAT_VERSION, "repo": _REPO_NAME, "seed": seed, "mineru": _adapter.mineru_version()}


def _manifest_matches(manifest: Path, expected: Mapping[str, Any], base: Path) -> bool:
    """Whether ``manifest`` records ``expected`` and every file it lists is in place."""
    try:
        recorded = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(recorded, dict) or any(recorded.get(key) != value for key, value in expected.items()):
        return False
    files = recorded.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for relative, size in files.items():
        try:
            if (base / relative).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def _list_files(folder: Path, base: Path) -> dict[str, int]:
    """Sizes of the files under ``folder``, keyed by path relative to ``base``."""
    return {
        file.relative_to(base).as_posix(): file.stat().st_size for file in sorted(folder.rglob("*")) if file.is_file()
    }


def _write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def _seeded(seed: int, component: str) -> Iterator[None]:
    """Seed torch for one component without disturbing the caller's random state.

    Each component gets its own seed, so the weights do not depend on build order.
    """
    import torch

    digest = hashlib.sha256(f"{seed}:{component}".encode()).digest()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        yield


def _numpy_rng(seed: int, component: str) -> np.random.Generator:
    import numpy as np

    digest = hashlib.sha256(f"{seed}:{component}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


# --------------------------------------------------------------------------- the tree


def _build_model_tree(repo: Path, seed: int) -> None:
    import torch

    # Weight surgery and calibration passes need no autograd history (and half the memory).
    with torch.no_grad():
        _build_layout(repo / _LAYOUT_DIR, seed)
        _build_ocr(repo / _OCR_DIR, seed)
        _build_formula(repo / _MFR_DIR, seed)
    _build_table_models(repo / _TABLE_DIR, seed)
    # MinerU accepts a model directory with the marker in it or in a parent up to the
    # repository root; mark the root and the two directory-valued entries.
    for folder in (repo, repo / _LAYOUT_DIR, repo / _OCR_DIR):
        (folder / _COMPLETE_MARKER).touch()


def _build_table_models(folder: Path, seed: int) -> None:
    """The three ONNX table stand-ins (see :func:`._tables.build_table_models`), seeded."""
    _tables.build_table_models(folder, _numpy_rng(seed, "tables"))


def _load_yaml(path: Path) -> Any:
    import yaml

    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


# --------------------------------------------------------------------------- layout


def _build_layout(folder: Path, seed: int) -> None:
    """PP-DocLayoutV2 (transformers), scripted to report ``_layout.LAYOUT_PLAN`` on every page."""
    from transformers import PPDocLayoutV2Config, PPDocLayoutV2ForObjectDetection

    # MinerU's own labels, thresholds and reading-order classes keep the model in step with MinerU.
    constants = _adapter.layout_label_constants()
    labels = list(constants.labels)
    config = PPDocLayoutV2Config(
        id2label=dict(enumerate(labels)),
        label2id={label: index for index, label in enumerate(labels)},
        class_thresholds=list(constants.class_thresholds),
        class_order=list(constants.class_order),
    )
    with _seeded(seed, "layout"):
        model = PPDocLayoutV2ForObjectDetection(config).eval()  # type: ignore[no-untyped-call]
    # One full pass on a calibration page; the decoder's inputs are kept, so the check
    # after scripting (which changes only the decoder and its heads) reruns the decoder alone.
    decoder_inputs: dict[str, Any] = {}

    def keep_inputs(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        decoder_inputs.update(kwargs)

    hook = model.model.decoder.register_forward_pre_hook(keep_inputs, with_kwargs=True)
    try:
        model(pixel_values=_layout.calibration_page(constants.image_size))
    finally:
        hook.remove()
    anchors = decoder_inputs["reference_points"][0].sigmoid().double()
    _layout.script_layout(model, labels, anchors)
    _layout.check_layout(labels, model.model.decoder(**decoder_inputs), model.config.class_thresholds)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    width, height = constants.image_size
    preprocessor = {
        "do_normalize": False,
        "do_rescale": True,
        "do_resize": True,
        "image_processor_type": "PPDocLayoutV2ImageProcessor",
        "rescale_factor": constants.rescale_factor,
        "size": {"height": height, "width": width},
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- OCR


def _ocr_rec_classes() -> int:
    """CTC classes of the recognizer: the dictionary's lines plus blank and space.

    MinerU sizes the recognizer from the weights (``head.head.weight``) and decodes with
    its bundled dictionary, so the two must agree.
    """
    with _adapter.ocr_dictionary().open(encoding="utf-8") as handle:
        lines = sum(1 for _ in handle)
    return lines + 2


def _build_ocr(folder: Path, seed: int) -> None:
    """The PP-OCR detectors and recognizer named in MinerU's models_config.yml."""
    import torch
    from safetensors.torch import save_file

    resources = _adapter.pytorchocr_resources()
    architectures = _load_yaml(resources / "arch_config.yaml")
    languages = _load_yaml(resources / "models_config.yml")["lang"]
    names = sorted({entry[kind] for entry in languages.values() for kind in ("det", "rec")})
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        stem = Path(name).stem
        config = copy.deepcopy(architectures[stem])
        kwargs: dict[str, Any] = {}
        if config["model_type"] == "rec":
            classes = _ocr_rec_classes()
            config["Head"]["out_channels_list"]["CTCLabelDecode"] = classes
            kwargs["out_channels"] = classes
        with _seeded(seed, f"ocr:{stem}"):
            # MinerU reparameterises (rep()) after loading, so save the raw state.
            network = _adapter.pytorchocr_model(config, **kwargs)
        state = {key: value.detach().contiguous().clone() for key, value in network.state_dict().items()}
        if name.endswith(".safetensors"):
            save_file(state, str(folder / name))
        else:
            torch.save(state, folder / name)


# --------------------------------------------------------------------------- formula


def _build_formula(folder: Path, seed: int) -> None:
    """PP-FormulaNet_plus-M that answers ``</s>`` at once, and its inference yml."""
    import torch

    configs = _load_yaml(_adapter.pytorchocr_resources() / "pp_formulanet_arch_config.yaml")
    architecture = copy.deepcopy(configs[_MFR_NAME]["Architecture"])
    with _seeded(seed, "formula"):
        network = _adapter.pytorchocr_model(architecture)
    _script_formula_eos(network)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), folder / f"{_MFR_NAME}.pth")
    _write_formula_yml(folder / f"{_MFR_NAME}_inference.yml")


def _script_formula_eos(network: Any) -> None:
    """Make every decoding step predict ``</s>`` (id 2) with a wide margin.

    The decoder's final layer norm gets zero gain, so its output is the constant bias
    vector; the ``</s>`` row of the (bias-free) output layer points along it.
    """
    head = network.head
    eos = int(head.eos_token_id)
    final_norm = head.decoder.model.decoder.layer_norm
    final_norm.weight.zero_()
    final_norm.bias.fill_(0.1)
    direction = final_norm.bias.detach()
    lm_head = head.decoder.lm_head
    lm_head.weight[eos].copy_(direction * (30.0 / float(direction.dot(direction))))


def _byte_level_tokenizer(special: Sequence[str]) -> Any:
    """A byte-level BPE tokenizer with no merges: specials first, then the 256 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: index for index, token in enumerate(special)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(special))
    return tokenizer


def _write_formula_yml(path: Path) -> None:
    import yaml

    special = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3, as UniMERNetDecode assumes
    tokenizer = _byte_level_tokenizer(special)
    added = {
        str(index): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for index, token in enumerate(special)
    }
    document = {
        "Global": {"model_name": _MFR_NAME},
        "PreProcess": {
            "transform_ops": [
                {"UniMERNetImgDecode": {"input_size": [384, 384]}},
                {"UniMERNetTestTransform": None},
                {"LatexImageFormat": None},
                {"KeepKeys": {"keep_keys": ["image"]}},
            ]
        },
        "PostProcess": {
            "name": "UniMERNetDecode",
            "character_dict": {
                "fast_tokenizer_file": json.loads(tokenizer.to_str()),
                "tokenizer_config_file": {
                    "added_tokens_decoder": added,
                    "bos_token": "<s>",
                    "eos_token": "</s>",
                    "pad_token": "<pad>",
                    "unk_token": "<unk>",
                    "model_max_length": 1024,
                },
            },
        },
    }
    with path.open("w", encoding="utf-8") as handle:
        yaml.safe_dump(document, handle, allow_unicode=True, sort_keys=False)


# --------------------------------------------------------------------------- tiny VLM


#: Qwen2-VL's special tokens; the chat template and the processor refer to them by name.
QWEN2_VL_SPECIAL_TOKENS: Final = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: The chat template Qwen2-VL ships with.
QWEN2_VL_CHAT_TEMPLATE: Final = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _build_tiny_vlm(folder: Path, seed: int) -> None:
    """A two-layer Qwen2-VL with a byte-level tokenizer, saved like a Hub checkpoint."""
    import torch
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    core = _byte_level_tokenizer(QWEN2_VL_SPECIAL_TOKENS)
    ids = {token: core.token_to_id(token) for token in QWEN2_VL_SPECIAL_TOKENS}
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=core,
        bos_token=None,
        eos_token="<|im_end|>",  # noqa: S106 - a token, not a password
        pad_token="<|endoftext|>",  # noqa: S106
        model_max_length=8192,
    )
    # Small images keep the random vision tower cheap on CPU; MinerU resizes anyway.
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=448 * 448)
    processor = Qwen2VLProcessor(  # type: ignore[no-untyped-call]
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    head_dim = 16
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": core.get_vocab_size(),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 64 // head_dim,
            "num_key_value_heads": 2,
            "max_position_embeddings": 8192,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "in_channels": 3,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    with _seeded(seed, "vlm"):
        model = Qwen2VLForConditionalGeneration(config).eval()  # type: ignore[no-untyped-call]
    # A random model never ends on its own (MinerU then generates up to 8192 tokens per
    # block). Zeroing the final norm makes every logit 0, greedy decoding picks id 0,
    # <|endoftext|>, and that is an end token, as in Qwen2-VL's own generation config.
    with torch.no_grad():
        model.model.language_model.norm.weight.zero_()
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = ids["<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image_processor.save_pretrained(folder)  # preprocessor_config.json, for AutoImageProcessor
