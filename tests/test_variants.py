"""The variant registry, the geometry read from config.json, and parameter counts."""

import json

import pytest

from gemma4_onnx import tolerances
from gemma4_onnx.cli import main
from gemma4_onnx.errors import ConfigError, UnknownVariantError
from gemma4_onnx.exporter.geometry import text_geometry
from gemma4_onnx.exporter.hf_model import hf_config
from gemma4_onnx.exporter.variants import FULL_SIZE, REGISTRY, TINY, get_variant, variant_config

from support import TRAINED_FIXTURES, trained_fixture


def test_cli_variants_json_reports_counts_within_two_percent_of_the_published_figures(capsys) -> None:
    assert main(["variants", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(REGISTRY)
    expected_keys = {"e2b": {"total", "effective"}, "e4b": {"total", "effective"}, "31b": {"language_model"},
                     "26b-a4b": {"language_model", "active"}}
    for name, keys in expected_keys.items():
        assert set(rows[name]["published"]) == keys
        for key, comparison in rows[name]["published"].items():
            assert comparison["relative_diff"] <= tolerances.PUBLISHED_PARAMS_RELATIVE, (name, key, comparison)


def test_counts_match_the_architecture_doc_exactly(capsys) -> None:
    main(["variants", "--json"])
    counts = {row["name"]: row["parameters"] for row in json.loads(capsys.readouterr().out)}
    # Architecture doc §2 (meta-device counts) and §5.1 (tiny configs).
    assert counts["e2b"]["total"] == 5_104_297_504
    assert counts["e2b"]["ple"] == 2_348_810_240
    assert counts["e4b"]["total"] == 7_941_100_832
    assert counts["31b"]["language_model"] == 30_697_345_280
    assert counts["26b-a4b"]["active"] == 3_822_530_560
    assert counts["tiny-e2b"]["total"] == 623_632
    assert counts["tiny-26b-a4b"]["total"] == 546_992
    assert counts["tiny-31b"]["total"] == 278_112


def test_cli_variants_table_lists_every_variant(capsys) -> None:
    assert main(["variants"]) == 0
    out = capsys.readouterr().out
    for name in REGISTRY:
        assert name in out


def test_unknown_variant_suggests_nearest_names() -> None:
    with pytest.raises(UnknownVariantError, match="did you mean e2b"):
        get_variant("e2c")


@pytest.mark.parametrize("name", list(REGISTRY))
def test_geometry_agrees_with_transformers(name: str) -> None:
    config = variant_config(name)
    geometry = text_geometry(config)
    text = hf_config(config).get_text_config()
    assert [s.kv_mode if s.kv_mode != "own" else None for s in geometry.layers] == text.kv_sharing_modes
    for spec in geometry.layers:
        layer = text.per_layer_config[spec.index]
        assert (spec.head_dim, spec.num_kv_heads) == (layer.head_dim, layer.num_key_value_heads)
        assert spec.attention == ("full" if text.layer_types[spec.index] == "full_attention" else "sliding")


@pytest.mark.parametrize("name", TINY)
def test_tiny_variants_exercise_every_feature_of_their_family(name: str) -> None:
    variant = get_variant(name)
    config, geometry = variant.config, text_geometry(variant.config)
    kinds = [s.attention for s in geometry.layers]
    assert "sliding" in kinds and kinds[-1] == "full"
    full = [s for s in geometry.layers if s.attention == "full"]
    sliding = [s for s in geometry.layers if s.attention == "sliding"]
    assert all(s.rope_fraction == 0.25 and s.rope_theta == 1e6 for s in full)
    assert all(s.head_dim > sliding[0].head_dim for s in full)
    assert geometry.final_logit_softcapping == 30.0 and config["tie_word_embeddings"]
    assert config["vision_config"] is not None
    if variant.family in ("e2b", "e4b"):
        assert geometry.ple_dim > 0
        assert any(s.kv_mode == "reuse" for s in geometry.layers)
        assert config["audio_config"] is not None and config["vision_config"]["use_clipped_linears"]
        if variant.family == "e2b":
            assert {s.mlp_width for s in geometry.layers if s.kv_mode == "reuse"} == {2 * sliding[0].mlp_width}
    else:
        assert all(s.k_eq_v and s.num_kv_heads < sliding[0].num_kv_heads for s in full)
        assert config["vision_config"]["standardize"] and config["audio_config"] is None
        assert (geometry.num_experts > 0) == (variant.family == "26b-a4b")


def test_full_size_e2b_cache_layout() -> None:
    geometry = text_geometry(variant_config("e2b"))
    assert len(geometry.cache_layers) == 15
    shared = [s for s in geometry.layers if s.kv_mode == "reuse"]
    assert len(shared) == 20
    assert {s.kv_producer for s in shared if s.attention == "sliding"} == {13}
    assert {s.kv_producer for s in shared if s.attention == "full"} == {14}
    assert {s.mlp_width for s in shared} == {12288}


def test_full_size_e4b_producers() -> None:
    geometry = text_geometry(variant_config("e4b"))
    assert len(geometry.cache_layers) == 24
    assert {s.kv_producer for s in geometry.layers if s.kv_mode == "reuse"} == {22, 23}


@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_variants_have_the_documented_shape(name: str) -> None:
    geometry = text_geometry(variant_config(name))
    layers, width = {"e2b": (35, 1536), "e4b": (42, 2560), "31b": (60, 5376), "26b-a4b": (30, 2816)}[name]
    assert (geometry.num_layers, geometry.hidden_size) == (layers, width)


@pytest.mark.parametrize("fixture", TRAINED_FIXTURES)
def test_both_config_spellings_give_the_same_geometry(fixture: str) -> None:
    saved = json.loads((trained_fixture(fixture) / "config.json").read_text())  # re-saved: per_layer_config
    shipped = json.loads(json.dumps(saved))
    text = shipped["text_config"]
    overrides = text.pop("per_layer_config")
    first = next(iter(overrides.values()))
    text["global_head_dim"] = first["head_dim"]
    text["num_global_key_value_heads"] = first.get("num_key_value_heads")
    assert text_geometry(saved) == text_geometry(shipped)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("num_hidden_layers", -1, "num_hidden_layers"),
    ("layer_types", ["sliding_attention"], "layer_types: has 1 entries"),
    ("num_kv_shared_layers", 99, "num_kv_shared_layers"),
    ("num_key_value_heads", 3, "not a multiple"),
])
def test_inconsistent_configs_are_refused_naming_the_field(field: str, value: object, message: str) -> None:
    config = variant_config("tiny-e2b")
    config["text_config"][field] = value
    with pytest.raises(ConfigError, match=message):
        text_geometry(config)
