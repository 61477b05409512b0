"""What ``gemma4-onnx variants`` prints: each variant's layer pattern and parameter counts, and how the
counts compare with the published figures."""

from typing import Any

from gemma4_onnx.exporter.geometry import layer_pattern_string, text_geometry
from gemma4_onnx.exporter.params import count_parameters
from gemma4_onnx.exporter.variants import REGISTRY, Variant


def published_comparison(variant: Variant, counts: dict[str, int | None]) -> dict[str, dict[str, float]]:
    """For each published figure: published value, ours, and the relative difference."""
    out = {}
    for key, published in vars(variant.published).items():
        ours = counts[key]
        if published is None or ours is None:
            continue
        out[key] = {"published": published, "computed": ours, "relative_diff": abs(ours - published) / published}
    return out


def variant_rows() -> list[dict[str, Any]]:
    rows = []
    for variant in REGISTRY.values():
        geometry = text_geometry(variant.config)
        counts = count_parameters(variant.config).as_dict()
        rows.append({
            "name": variant.name,
            "family": variant.family,
            "layers": geometry.num_layers,
            "layer_pattern": layer_pattern_string(geometry),
            "cache_layers": len(geometry.cache_layers),
            "parameters": counts,
            "published": published_comparison(variant, counts),
        })
    return rows
