"""MinerU's model code and data files, for the random-weight model trees of :mod:`mineru_vram.testing`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class LayoutConstants:
    """What MinerU's PP-DocLayoutV2 wrapper assumes about the layout model.

    Attributes:
        labels: the class labels, in the order of the model's outputs.
        class_thresholds: per-class score thresholds, in label order.
        class_order: per-class reading-order groups, in label order.
        image_size: ``(width, height)`` the page is resized to.
        rescale_factor: the pixel scale applied before the model.
    """

    labels: tuple[str, ...]
    class_thresholds: tuple[float, ...]
    class_order: tuple[int, ...]
    image_size: tuple[int, int]
    rescale_factor: float


def layout_label_constants() -> LayoutConstants:
    """PP-DocLayoutV2's labels, thresholds, reading-order classes and input size, as MinerU uses them.

    Read from ``mineru.model.layout.pp_doclayout_v2_base``, MinerU's torch-free
    constants module, so a model built from them stays in step with MinerU.
    Importing it does not import ``mineru.config``.
    """
    from mineru.model.layout.pp_doclayout_v2_base import (
        DEFAULT_CLASS_ORDER,
        DEFAULT_CLASS_THRESHOLDS,
        DEFAULT_IMAGE_SIZE,
        DEFAULT_RESCALE_FACTOR,
        PP_DOCLAYOUT_V2_LABELS,
    )

    width, height = DEFAULT_IMAGE_SIZE
    return LayoutConstants(
        labels=tuple(PP_DOCLAYOUT_V2_LABELS),
        class_thresholds=tuple(float(value) for value in DEFAULT_CLASS_THRESHOLDS),
        class_order=tuple(int(value) for value in DEFAULT_CLASS_ORDER),
        image_size=(int(width), int(height)),
        rescale_factor=float(DEFAULT_RESCALE_FACTOR),
    )


def pytorchocr_model(arch_config: dict[str, Any], **kwargs: Any) -> Any:
    """A new network of MinerU's pytorchocr ``BaseModel`` (random weights) for ``arch_config``.

    MinerU builds its OCR detectors, recognizers and PP-FormulaNet from these
    architecture configurations (see :func:`pytorchocr_resources`).
    """
    from mineru.model._internal.pytorchocr.modeling.architectures.base_model import BaseModel

    return BaseModel(arch_config, **kwargs)


def mineru_resource(package: str, *parts: str) -> Path:
    """A data file shipped inside one of MinerU's packages, found without importing ``mineru.config``."""
    from importlib import resources

    return Path(str(resources.files(package).joinpath(*parts)))


def pytorchocr_resources() -> Path:
    """MinerU's pytorchocr resource folder: ``arch_config.yaml``, ``models_config.yml``,
    ``pp_formulanet_arch_config.yaml``."""
    return mineru_resource("mineru.model._internal.pytorchocr.utils", "resources")


def ocr_dictionary() -> Path:
    """The character dictionary MinerU decodes its PP-OCRv6 recognizer's output with."""
    return mineru_resource("mineru.model.ocr", "data", "ppocrv6_dict.txt")
