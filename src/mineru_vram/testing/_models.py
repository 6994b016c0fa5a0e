"""Model trees with MinerU's true architectures and random weights, for tests.

:func:`write_random_models` writes the ``MinerU-4_models_torch`` tree that MinerU 4.0.x
reads with ``model.source: local`` and ``model.small_backend: torch``: the layout and
formula models keep their real architectures and sizes (so memory behaves as in
production), while their weights are random. Untrained networks have two traps, both
handled here by scripting a few weights:

* A random layout detector picks its 300 queries by position, not content, and labels
  nearly all of them alike, so the lazily loaded formula and table models would never
  run. Its decoder is scripted instead (see :func:`_script_layout`): the first layer
  turns each query's anchor position into a region indicator, the later residual
  branches are zeroed, and the class and box heads map regions to the fixed page plan
  in :data:`_LAYOUT_PLAN` (text, a display and an inline formula, a table). Backbone,
  encoder and every attention layer still run at full size, with the released
  configuration (53.6 million parameters); only the answer no longer depends on the
  page.
* A random formula decoder never emits end-of-sequence and runs to its 2560-token limit.
  Its final layer norm and the ``</s>`` row of its output layer are scripted so the
  first token is ``</s>``.

The three table models are ONNX files that MinerU runs with onnxruntime. The stand-ins
are tiny networks with the real input and output contracts (see
:func:`_build_table_models`), written as ONNX protobuf directly:
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
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from mineru_vram import _adapter
from mineru_vram._process import exclusive

if TYPE_CHECKING:
    import numpy as np
    import torch

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

#: What the scripted layout model reports on every page: (label, cx, cy, w, h), with the
#: box as fractions of the page. The inline formula sits inside the text block above it,
#: which is how MinerU tells inline from display formulas.
_LAYOUT_PLAN: Final[tuple[tuple[str, float, float, float, float], ...]] = (
    ("text", 0.50, 0.10, 0.80, 0.06),
    ("text", 0.50, 0.22, 0.80, 0.12),
    ("display_formula", 0.50, 0.35, 0.40, 0.05),
    ("text", 0.50, 0.47, 0.80, 0.10),
    ("inline_formula", 0.35, 0.47, 0.15, 0.03),
    ("table", 0.50, 0.68, 0.80, 0.24),
    ("text", 0.50, 0.88, 0.80, 0.06),
)

#: Table structure the wireless stand-in emits: two rows of three cells.
_TABLE_ROWS: Final = 2
_TABLE_COLS: Final = 3

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


def _load_yaml(path: Path) -> Any:
    import yaml

    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


# --------------------------------------------------------------------------- layout


def _build_layout(folder: Path, seed: int) -> None:
    """PP-DocLayoutV2 (transformers), scripted to report :data:`_LAYOUT_PLAN` on every page."""
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
        model(pixel_values=_calibration_page(constants.image_size))
    finally:
        hook.remove()
    anchors = decoder_inputs["reference_points"][0].sigmoid().double()
    _script_layout(model, labels, anchors)
    _check_layout(labels, model.model.decoder(**decoder_inputs), model.config.class_thresholds)
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


def _calibration_page(size: tuple[int, int]) -> torch.Tensor:
    """A page-like input for the layout model: white, with dark text bars and a ruled grid."""
    import torch

    width, height = size
    page = torch.ones(1, 3, height, width)
    for top in range(height // 10, height * 9 // 10, max(height // 40, 4)):
        page[..., top : top + max(height // 160, 2), width // 10 : width * 8 // 10] = 0.1
    for column in range(width // 5, width * 4 // 5 + 1, width // 5):
        page[..., height * 6 // 10 : height * 8 // 10, column : column + 2] = 0.0
    return page


def _region_thresholds(values: Sequence[float], regions: int) -> list[tuple[float, float]]:
    """Cuts that split ``values`` into ``regions`` runs of similar size, plus a margin each side.

    The ``regions + 2`` groups (a background group at each end) hold about the same
    number of values each, and every cut falls in a gap between distinct values, so a
    few anchors more or fewer on some page (or device) leave every region populated.

    Returns:
        ``(threshold, gap)`` for each of the ``regions + 1`` cuts, in increasing order;
        ``gap`` is the distance between the two values the cut separates.

    Raises:
        RuntimeError: If there are too few distinct values.
    """
    counts: dict[float, int] = {}
    for value in values:
        key = round(float(value), 6)
        counts[key] = counts.get(key, 0) + 1
    distinct = sorted(counts)
    groups = regions + 2
    if len(distinct) < groups:
        raise RuntimeError(
            f"the random layout model picked anchors at only {len(distinct)} distinct positions; "
            f"{groups} are needed to script it (try another seed)"
        )
    before = [0]  # before[i]: how many values lie below distinct[i]
    for value in distinct:
        before.append(before[-1] + counts[value])
    total = before[-1]
    cuts: list[tuple[float, float]] = []
    previous = 0
    for cut in range(1, groups):
        # Boundary i sits between distinct[i - 1] and distinct[i]; leave room for the rest.
        candidates = range(previous + 1, len(distinct) - (groups - 1 - cut))
        boundary = min(candidates, key=lambda i: abs(before[i] - cut * total / groups))
        low, high = distinct[boundary - 1], distinct[boundary]
        cuts.append((0.5 * (low + high), high - low))
        previous = boundary
    return cuts


def _script_layout(model: Any, labels: Sequence[str], anchors: torch.Tensor) -> None:
    """Make the decoder report :data:`_LAYOUT_PLAN` whatever the page shows.

    A random encoder picks its 300 queries' anchor boxes by position, not by content, so
    the anchor is what tells the queries apart. The first decoder layer's deformable
    cross-attention turns it into features: the value map is a constant, one sampling
    point lies on the anchor (inside the image) and the others far outside (zero
    padding), and the query-position embedding (set to the raw box) drives the softmax
    weight of the inside point, so each head reports a sharp step of the anchor's
    coordinate at a chosen threshold. The output projection turns neighbouring steps
    into one indicator per region between thresholds, and every residual branch after
    that is zeroed, so the indicators reach the heads unchanged. The thresholds split
    the anchors picked on a calibration page, along the axis where they spread most,
    into one region per planned box plus a background margin at each end; each region
    holds many anchors, so a few anchors more or fewer on another page change nothing.
    (A learned code per query, ``learn_initial_query``, would be simpler, but
    transformers 5.24 crashes with it, calling ``.tile`` on an ``nn.Embedding``, and it
    would depart from the released configuration.)

    The class head gives each region its planned label (sigmoid(6)) and everything else
    sigmoid(-10). Boxes go through the iterative refinement: two layers push every
    reference point to ``inverse_sigmoid``'s clamp (``1e-5``), which forgets the anchor,
    and the third adds the planned box of the query's region.
    """
    import torch
    import torch.nn.functional as F

    config = model.config
    decoder = model.model.decoder
    width = int(config.d_model)
    eps = float(config.layer_norm_eps)
    plan_size = len(_LAYOUT_PLAN)
    feature_base = 8  # dims 0..3 carry the query position, feature_base.. the indicators
    gain = 1000.0  # indicators dwarf the O(1) content of the normalised hidden state

    inside = (anchors > 0.0).all(-1) & (anchors < 0.99).all(-1)  # off-page anchors sit at 1.0
    spread = anchors[inside][:, :2].std(0)
    axis = int(spread.argmax())
    cuts = _region_thresholds(anchors[inside][:, axis].tolist(), plan_size)

    for layer in decoder.layers:
        for projection in (layer.self_attn.o_proj, layer.encoder_attn.output_proj, layer.mlp.fc2):
            projection.weight.zero_()
            projection.bias.zero_()
        for norm in (layer.self_attn_layer_norm, layer.encoder_attn_layer_norm, layer.final_layer_norm):
            norm.weight.fill_(1.0)
            norm.bias.zero_()

    # Query position embedding = (cx, cy, w, h, 0, ...).
    position_in, position_out = decoder.query_pos_head.layers
    for linear in (position_in, position_out):
        linear.weight.zero_()
        linear.bias.zero_()
        linear.weight[:4, :4] = torch.eye(4)

    first = decoder.layers[0]
    first.self_attn_layer_norm.weight[: feature_base + plan_size] = 0.0  # room for position and indicators
    attention = first.encoder_attn
    heads, levels, points = attention.n_heads, attention.n_levels, attention.n_points
    head_dim = width // heads
    if heads < len(cuts):
        raise RuntimeError(f"the layout decoder has {heads} heads; the plan needs {len(cuts)}")
    attention.value_proj.weight.zero_()
    attention.value_proj.bias.zero_()
    attention.value_proj.bias[::head_dim] = 1.0
    attention.sampling_offsets.weight.zero_()
    offsets = torch.full((heads, levels, points, 2), 1000.0)  # far off the page
    offsets[:, 0, 0] = 0.0  # ... except the first point of the first level: on the anchor
    attention.sampling_offsets.bias.copy_(offsets.reshape(-1))
    attention.attention_weights.weight.zero_()
    logits = torch.zeros(heads, levels, points)
    logits[:, 0, 0] = -30.0  # unused heads: inside weight ~0
    weights = attention.attention_weights.weight.view(heads, levels, points, width)
    others = levels * points - 1
    for head, (threshold, gap) in enumerate(cuts):
        sharpness = 40.0 / gap  # +-20 at the neighbouring anchors
        weights[head, 0, 0, axis] = sharpness
        logits[head, 0, 0] = math.log(others) - sharpness * threshold
    attention.attention_weights.bias.copy_(logits.reshape(-1))
    projection = attention.output_proj
    for region in range(plan_size):
        projection.weight[feature_base + region, region * head_dim] = gain
        projection.weight[feature_base + region, (region + 1) * head_dim] = -gain

    # What the heads see for each planned region: the indicator through the layer norms.
    hidden = torch.zeros(plan_size, width, dtype=torch.float64)
    hidden[:, feature_base : feature_base + plan_size] = gain * torch.eye(plan_size, dtype=torch.float64)
    for _ in range(2 + 3 * (len(decoder.layers) - 1)):
        hidden = F.layer_norm(hidden, (width,), eps=eps)

    background, foreground = -10.0, 6.0
    targets = torch.full((plan_size, len(labels)), background, dtype=torch.float64)
    for region, (label, *_box) in enumerate(_LAYOUT_PLAN):
        targets[region, labels.index(label)] = foreground
    class_head = decoder.class_embed[-1]
    class_head.weight.copy_((torch.linalg.pinv(hidden) @ (targets - background)).T)
    class_head.bias.fill_(background)

    # Box refinement: reference = sigmoid(delta + inverse_sigmoid(reference)).
    for index, head in enumerate(decoder.bbox_embed):
        last = head.layers[-1]
        last.weight.zero_()
        last.bias.fill_(-40.0 if index < 2 else 0.0)
    steer = decoder.bbox_embed[2]
    for inner in steer.layers[:-1]:
        inner.weight.copy_(torch.eye(width))
        inner.bias.zero_()
    clamp_logit = math.log(1e-5)  # inverse_sigmoid(x) for any x under its 1e-5 clamp
    deltas = torch.tensor(
        [[_logit(value) - clamp_logit for value in box] for _label, *box in _LAYOUT_PLAN], dtype=torch.float64
    )
    steer.layers[-1].weight.copy_((torch.linalg.pinv(torch.relu(hidden)) @ deltas).T)


def _check_layout(labels: Sequence[str], output: Any, class_thresholds: Sequence[float]) -> None:
    """Fail loudly unless the scripted layout model's ``output`` is exactly the plan."""
    import torch

    logits = output.intermediate_logits[0, -1]
    boxes = output.intermediate_reference_points[0, -1]
    scores, classes = logits.sigmoid().max(-1)
    valid = scores >= torch.tensor(class_thresholds)[classes]
    found = {
        (labels[int(label)], tuple(round(float(value), 3) for value in box))
        for label, box in zip(classes[valid], boxes[valid], strict=True)
    }
    wanted = {(label, tuple(round(v, 3) for v in box)) for label, *box in _LAYOUT_PLAN}
    if found != wanted:
        raise RuntimeError(f"scripted layout model reports {sorted(found)}, expected {sorted(wanted)}")


def _logit(value: float) -> float:
    return math.log(value / (1.0 - value))


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


# --------------------------------------------------------------------------- tables


def _build_table_models(folder: Path, seed: int) -> None:
    """ONNX stand-ins for MinerU's three table models.

    What MinerU feeds and reads (mineru/model/table/):

    * ``PP-LCNet_x1_0_table_cls.onnx``: input ``x`` ``[N, 3, 224, 224]``; output
      ``[N, 2]`` scores for (wired, wireless). The stand-in answers "wired" with about
      0.98, so both structure models run (the wireless one always does).
    * ``slanet-plus.onnx``: input ``[N, 3, 488, 488]``; outputs ``loc_preds``
      ``[N, L, 8]`` (cell polygons in 0..1) and ``structure_probs`` ``[N, L, C]`` over
      the vocabulary stored in the model's ``character`` metadata (MinerU adds ``sos``,
      ``eos`` and ``<td></td>``). The stand-in spells a two-by-three table.
    * ``unet.onnx``: input ``[1, 3, H, W]`` (H, W at most 1024); output ``[1, 1, H, W]``
      with 1 on horizontal and 2 on vertical ruling lines. The stand-in draws a
      two-by-three grid at any size.

    Each stand-in also runs a small convolution over the image, so onnxruntime does
    real work, but its answer does not depend on the page.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = _numpy_rng(seed, "tables")
    (folder / "PP-LCNet_x1_0_table_cls.onnx").write_bytes(_table_cls_onnx(rng))
    (folder / "slanet-plus.onnx").write_bytes(_slanet_onnx(rng))
    (folder / "unet.onnx").write_bytes(_unet_onnx(rng))


def _image_features(graph: _OnnxGraph, rng: np.random.Generator, image: str, channels: int, stride: int) -> str:
    """Conv + ReLU + global average pool + flatten: ``[N, channels]``."""
    import numpy as np

    kernel = graph.const(rng.normal(0.0, 0.1, (channels, 3, 3, 3)).astype(np.float32))
    conv = graph.op("Conv", image, kernel, kernel_shape=[3, 3], strides=[stride, stride], pads=[1, 1, 1, 1])
    pooled = graph.op("GlobalAveragePool", graph.op("Relu", conv))
    return graph.op("Flatten", pooled, axis=1)


def _table_cls_onnx(rng: np.random.Generator) -> bytes:
    import numpy as np

    graph = _OnnxGraph()
    features = _image_features(graph, rng, "x", channels=8, stride=4)
    weight = graph.const(rng.normal(0.0, 0.01, (8, 2)).astype(np.float32))
    bias = graph.const(np.array([4.0, 0.0], dtype=np.float32))  # softmax ~ (0.98, 0.02): wired
    scores = graph.op("Softmax", graph.op("Gemm", features, weight, bias), axis=-1)
    return graph.model(
        inputs=[("x", 1, ["N", 3, 224, 224])],
        outputs=[(scores, 1, ["N", 2])],
        output_names={scores: "softmax_out"},
    )


def _slanet_vocabulary() -> list[str]:
    spans = [f' colspan="{n}"' for n in range(2, 6)] + [f' rowspan="{n}"' for n in range(2, 6)]
    return ["<thead>", "</thead>", "<tbody>", "</tbody>", "<tr>", "</tr>", "<td>", "<td", ">", "</td>", *spans]


def _slanet_onnx(rng: np.random.Generator) -> bytes:
    import numpy as np

    vocabulary = _slanet_vocabulary()
    # The decoder's view of the vocabulary (TableLabelDecode, merge_no_span_structure).
    decoded = ["sos", *[piece for piece in vocabulary if piece != "<td>"], "<td></td>", "eos"]
    index = {piece: position for position, piece in enumerate(decoded)}
    row = ["<tr>", *["<td></td>"] * _TABLE_COLS, "</tr>"]
    sequence = ["<tbody>", *row * _TABLE_ROWS, "</tbody>", "eos"]
    length = len(sequence) + 2
    sequence += ["eos"] * (length - len(sequence))
    logits = np.full((length, len(decoded)), -8.0, dtype=np.float32)
    boxes = np.full((length, 8), 0.01, dtype=np.float32)
    cell = 0
    for step, piece in enumerate(sequence):
        logits[step, index[piece]] = 8.0
        if piece == "<td></td>":
            r, c = divmod(cell, _TABLE_COLS)
            x0, x1 = (c + 0.05) / _TABLE_COLS, (c + 0.95) / _TABLE_COLS
            y0, y1 = (r + 0.05) / _TABLE_ROWS, (r + 0.95) / _TABLE_ROWS
            boxes[step] = [x0, y0, x1, y0, x1, y1, x0, y1]
            cell += 1
    graph = _OnnxGraph()
    features = _image_features(graph, rng, "x", channels=8, stride=8)
    structure_weight = graph.const(rng.normal(0.0, 0.01, (8, logits.size)).astype(np.float32))
    structure = graph.op("Gemm", features, structure_weight, graph.const(logits.reshape(-1)))
    structure = graph.op("Reshape", structure, graph.const(np.array([-1, *logits.shape], dtype=np.int64)))
    structure = graph.op("Softmax", structure, axis=-1)
    box_logits = np.log(boxes / (1.0 - boxes)).astype(np.float32)
    location_weight = graph.const(rng.normal(0.0, 0.01, (8, box_logits.size)).astype(np.float32))
    location = graph.op("Sigmoid", graph.op("Gemm", features, location_weight, graph.const(box_logits.reshape(-1))))
    location = graph.op("Reshape", location, graph.const(np.array([-1, *boxes.shape], dtype=np.int64)))
    return graph.model(
        inputs=[("x", 1, ["N", 3, 488, 488])],
        outputs=[(location, 1, ["N", length, 8]), (structure, 1, ["N", length, len(decoded)])],
        output_names={location: "loc_preds", structure: "structure_probs"},
        metadata={"character": "\n".join(vocabulary)},
    )


def _unet_onnx(rng: np.random.Generator) -> bytes:
    import numpy as np

    graph = _OnnxGraph()
    one = graph.const(np.array(1, dtype=np.int64))
    two = graph.const(np.array(2, dtype=np.int64))
    zero = graph.const(np.array(0, dtype=np.int64))
    thickness = graph.const(np.array(3, dtype=np.int64))
    shape = graph.op("Shape", "img")

    def ruling(axis: int, cells: int) -> str:
        size = graph.op("Gather", shape, graph.const(np.array(axis, dtype=np.int64)), axis=0)
        positions = graph.op("Range", zero, size, one)
        period = graph.op("Div", size, graph.const(np.array(cells, dtype=np.int64)))
        inner = graph.op("Less", graph.op("Mod", positions, period), thickness)
        edge = graph.op("GreaterOrEqual", positions, graph.op("Sub", size, thickness))
        return graph.op("Or", inner, edge)

    rows = graph.op("Unsqueeze", ruling(2, _TABLE_ROWS), graph.const(np.array([1], dtype=np.int64)))
    cols = graph.op("Unsqueeze", ruling(3, _TABLE_COLS), graph.const(np.array([0], dtype=np.int64)))
    grid = graph.op("Where", rows, one, graph.op("Where", cols, two, zero))
    grid = graph.op("Unsqueeze", grid, graph.const(np.array([0, 1], dtype=np.int64)))
    # Tie the answer to the image (always zero, but onnxruntime must run the conv).
    features = _image_features(graph, rng, "img", channels=4, stride=8)
    zeroed = graph.op("Mul", graph.op("Sigmoid", features), graph.const(np.array(0.0, dtype=np.float32)))
    nothing = graph.op("Cast", graph.op("Floor", zeroed), to=_ONNX_DTYPES["int64"])
    nothing = graph.op("ReduceMax", nothing, axes=[1], keepdims=1)  # opset 17: axes is an attribute
    nothing = graph.op("Unsqueeze", nothing, graph.const(np.array([2, 3], dtype=np.int64)))
    output = graph.op("Add", grid, nothing)
    return graph.model(
        inputs=[("img", 1, ["N", 3, "H", "W"])],
        outputs=[(output, 7, ["N", 1, "H", "W"])],
        output_names={output: "output"},
    )


# --------------------------------------------------------------------------- ONNX writer


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 fields take negative numbers as ten-byte varints
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_varint(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _field_str(number: int, text: str) -> bytes:
    return _field_bytes(number, text.encode("utf-8"))


def _field_float(number: int, value: float) -> bytes:
    return _varint(number << 3 | 5) + struct.pack("<f", value)


#: ONNX TensorProto.DataType codes for the numpy dtypes used here.
_ONNX_DTYPES: Final = {"float32": 1, "int64": 7, "bool": 9}


class _OnnxGraph:
    """Just enough of the ONNX protobuf (onnx.proto3, IR 8, opset 17) to write small graphs.

    Field numbers follow onnx/onnx.proto: ModelProto, GraphProto, NodeProto,
    AttributeProto, TensorProto, ValueInfoProto.
    """

    def __init__(self) -> None:
        self._nodes: list[bytes] = []
        self._initializers: list[bytes] = []
        self._count = 0
        self._renames: dict[str, str] = {}

    def _name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def const(self, array: np.ndarray) -> str:
        """Add ``array`` as an initializer and return its name."""
        import numpy as np

        name = self._name("const")
        data = np.ascontiguousarray(array)
        tensor = b"".join(_field_varint(1, int(dim)) for dim in data.shape)
        tensor += _field_varint(2, _ONNX_DTYPES[str(data.dtype)])
        tensor += _field_str(8, name)
        tensor += _field_bytes(9, data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes())
        self._initializers.append(tensor)
        return name

    def op(self, op_type: str, *inputs: str, **attributes: int | float | list[int]) -> str:
        """Add a node with one output and return the output's name."""
        output = self._name(op_type.lower())
        node = b"".join(_field_str(1, name) for name in inputs)
        node += _field_str(2, output) + _field_str(3, output) + _field_str(4, op_type)
        for key, value in attributes.items():
            node += _field_bytes(5, _attribute(key, value))
        self._nodes.append(node)
        return output

    def model(
        self,
        *,
        inputs: Sequence[tuple[str, int, Sequence[int | str]]],
        outputs: Sequence[tuple[str, int, Sequence[int | str]]],
        output_names: Mapping[str, str],
        metadata: Mapping[str, str] | None = None,
    ) -> bytes:
        """Serialise the graph as a ModelProto, renaming the outputs as given."""
        nodes = list(self._nodes)
        renamed_outputs = []
        for name, elem_type, shape in outputs:
            final = output_names[name]
            nodes.append(_field_str(1, name) + _field_str(2, final) + _field_str(3, final) + _field_str(4, "Identity"))
            renamed_outputs.append((final, elem_type, shape))
        graph = b"".join(_field_bytes(1, node) for node in nodes)
        graph += _field_str(2, "mineru_vram_stand_in")
        graph += b"".join(_field_bytes(5, tensor) for tensor in self._initializers)
        graph += b"".join(_field_bytes(11, _value_info(*spec)) for spec in inputs)
        graph += b"".join(_field_bytes(12, _value_info(*spec)) for spec in renamed_outputs)
        model = _field_varint(1, 8)  # ir_version
        model += _field_str(2, "mineru_vram")
        model += _field_bytes(7, graph)
        model += _field_bytes(8, _field_str(1, "") + _field_varint(2, 17))  # opset_import
        for key, value in (metadata or {}).items():
            model += _field_bytes(14, _field_str(1, key) + _field_str(2, value))
        return model


def _attribute(name: str, value: int | float | list[int]) -> bytes:
    out = _field_str(1, name)
    if isinstance(value, int):
        return out + _field_varint(3, int(value)) + _field_varint(20, 2)  # INT
    if isinstance(value, float):
        return out + _field_float(2, value) + _field_varint(20, 1)  # FLOAT
    return out + b"".join(_field_varint(8, int(item)) for item in value) + _field_varint(20, 7)  # INTS


def _value_info(name: str, elem_type: int, shape: Sequence[int | str]) -> bytes:
    dims = b"".join(
        _field_bytes(1, _field_str(2, dim) if isinstance(dim, str) else _field_varint(1, dim)) for dim in shape
    )
    tensor_type = _field_varint(1, elem_type) + _field_bytes(2, dims)
    return _field_str(1, name) + _field_bytes(2, _field_bytes(1, tensor_type))


# --------------------------------------------------------------------------- tiny VLM


#: Qwen2-VL's special tokens; the chat template and the processor refer to them by name.
_VLM_SPECIAL_TOKENS: Final = (
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
_QWEN2_VL_CHAT_TEMPLATE: Final = (
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

    core = _byte_level_tokenizer(_VLM_SPECIAL_TOKENS)
    ids = {token: core.token_to_id(token) for token in _VLM_SPECIAL_TOKENS}
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
        chat_template=_QWEN2_VL_CHAT_TEMPLATE,
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
