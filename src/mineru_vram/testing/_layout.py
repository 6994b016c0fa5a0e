"""The scripted PP-DocLayoutV2: a random layout model that reports a fixed page plan.

A random layout detector picks its 300 queries by position, not content, and labels
nearly all of them alike, so MinerU's lazily loaded formula and table models would
never run. :func:`script_layout` rewrites a few of its decoder weights so that, on any
page, it reports :data:`LAYOUT_PLAN`; the rest of the network keeps its random
weights and full size. Used by :mod:`mineru_vram.testing._models`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import torch

__all__ = ["LAYOUT_PLAN", "calibration_page", "check_layout", "region_thresholds", "script_layout"]

#: What the scripted layout model reports on every page: (label, cx, cy, w, h), with the
#: box as fractions of the page. The inline formula sits inside the text block above it,
#: which is how MinerU tells inline from display formulas.
LAYOUT_PLAN: Final[tuple[tuple[str, float, float, float, float], ...]] = (
    ("text", 0.50, 0.10, 0.80, 0.06),
    ("text", 0.50, 0.22, 0.80, 0.12),
    ("display_formula", 0.50, 0.35, 0.40, 0.05),
    ("text", 0.50, 0.47, 0.80, 0.10),
    ("inline_formula", 0.35, 0.47, 0.15, 0.03),
    ("table", 0.50, 0.68, 0.80, 0.24),
    ("text", 0.50, 0.88, 0.80, 0.06),
)


def calibration_page(size: tuple[int, int]) -> torch.Tensor:
    """A page-like input for the layout model: white, with dark text bars and a ruled grid."""
    import torch

    width, height = size
    page = torch.ones(1, 3, height, width)
    for top in range(height // 10, height * 9 // 10, max(height // 40, 4)):
        page[..., top : top + max(height // 160, 2), width // 10 : width * 8 // 10] = 0.1
    for column in range(width // 5, width * 4 // 5 + 1, width // 5):
        page[..., height * 6 // 10 : height * 8 // 10, column : column + 2] = 0.0
    return page


def region_thresholds(values: Sequence[float], regions: int) -> list[tuple[float, float]]:
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


def script_layout(model: Any, labels: Sequence[str], anchors: torch.Tensor) -> None:
    """Make the decoder report :data:`LAYOUT_PLAN` whatever the page shows.

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
    plan_size = len(LAYOUT_PLAN)
    feature_base = 8  # dims 0..3 carry the query position, feature_base.. the indicators
    gain = 1000.0  # indicators dwarf the O(1) content of the normalised hidden state

    inside = (anchors > 0.0).all(-1) & (anchors < 0.99).all(-1)  # off-page anchors sit at 1.0
    spread = anchors[inside][:, :2].std(0)
    axis = int(spread.argmax())
    cuts = region_thresholds(anchors[inside][:, axis].tolist(), plan_size)

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
    for region, (label, *_box) in enumerate(LAYOUT_PLAN):
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
        [[_logit(value) - clamp_logit for value in box] for _label, *box in LAYOUT_PLAN], dtype=torch.float64
    )
    steer.layers[-1].weight.copy_((torch.linalg.pinv(torch.relu(hidden)) @ deltas).T)


def check_layout(labels: Sequence[str], output: Any, class_thresholds: Sequence[float]) -> None:
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
    wanted = {(label, tuple(round(v, 3) for v in box)) for label, *box in LAYOUT_PLAN}
    if found != wanted:
        raise RuntimeError(f"scripted layout model reports {sorted(found)}, expected {sorted(wanted)}")


def _logit(value: float) -> float:
    return math.log(value / (1.0 - value))
