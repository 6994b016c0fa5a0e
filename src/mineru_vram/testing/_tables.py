"""ONNX stand-ins for MinerU's three table models, and the small ONNX writer they need.

MinerU runs its table models with onnxruntime. The stand-ins are tiny networks with
the real input and output contracts (see :func:`build_table_models`), written as
ONNX protobuf directly: ``torch.onnx.export`` needs the ``onnx`` package, which
``mineru[torch]`` does not install. Used by :mod:`mineru_vram.testing._models`.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import numpy as np

__all__ = ["build_table_models"]

#: Table structure the wireless stand-in emits: two rows of three cells.
_TABLE_ROWS: Final = 2
_TABLE_COLS: Final = 3


def build_table_models(folder: Path, rng: np.random.Generator) -> None:
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
