"""Parameter counts, size strings and the size -> shape solver (torch-free)."""

import subprocess
import sys

import pytest

from cbd_engine.spec.families import ModelSpec
from cbd_engine.spec.shapes import Shape, ShapeError, parse_size, solve_shape

GPT2_BASE = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024}


@pytest.mark.parametrize(("layers", "heads", "hidden", "ffn", "expected_millions"), [
    (14, 12, 768, 3072, 138.62), (18, 14, 896, 3584, 219.57), (26, 16, 1024, 4096, 380.02),
])
def test_paper_gpt2_slm_table(layers, heads, hidden, ffn, expected_millions):
    spec = ModelSpec.from_config({**GPT2_BASE, "n_layer": layers, "n_head": heads, "n_embd": hidden, "n_inner": ffn})
    assert round(spec.num_params / 1e6, 2) == expected_millions


@pytest.mark.parametrize("family", ["llama", "llama_untied_bias", "qwen2", "qwen3", "mistral", "gpt2", "gpt_neox"])
def test_param_count_equals_transformers(tiny_model, family):
    import json

    from transformers import AutoModelForCausalLM

    folder = tiny_model(family)
    spec = ModelSpec.from_config(json.loads((folder / "config.json").read_text()))
    assert spec.num_params == AutoModelForCausalLM.from_pretrained(folder).num_parameters()


def test_parse_size():
    assert parse_size("138M") == 138_000_000
    assert parse_size("1.2B") == 1_200_000_000
    assert parse_size(100_000_000) == parse_size("100M")
    for bad in ("abc", "-5M", 0, True, "12X"):
        with pytest.raises(ShapeError):
            parse_size(bad)


def _smol_like():
    config = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
              "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152,
              "max_position_embeddings": 8192, "tie_word_embeddings": True}
    spec = ModelSpec.from_config(config)
    small = Shape(num_layers=20, hidden_size=384, num_heads=6, num_kv_heads=2, head_dim=64, intermediate_size=1024,
                  vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True)
    return spec, small


@pytest.mark.parametrize("target", [55e6, 70e6, 90e6, 100e6, 120e6])
def test_solver_within_three_percent_and_between_anchors(target):
    spec, small = _smol_like()
    arch = spec.architecture
    shape = solve_shape(arch, small, spec.shape, int(target))
    assert abs(arch.num_params(shape) - target) <= 0.03 * target
    for axis in ("num_layers", "hidden_size", "num_heads", "intermediate_size"):
        assert getattr(small, axis) <= getattr(shape, axis) <= getattr(spec.shape, axis)
    assert shape.intermediate_size % 64 == 0 and shape.num_heads % shape.num_kv_heads == 0
    assert shape.group_size == 3 and shape.hidden_size % shape.num_heads == 0
    arch.validate(shape)


def test_solver_is_deterministic_and_monotone():
    spec, small = _smol_like()
    arch = spec.architecture
    counts = [arch.num_params(solve_shape(arch, small, spec.shape, int(m * 1e6))) for m in range(55, 135, 5)]
    assert counts == sorted(counts)
    assert solve_shape(arch, small, spec.shape, 100_000_000) == solve_shape(arch, small, spec.shape, parse_size("100M"))


def test_solver_gives_the_anchors_back_at_their_sizes():
    spec, small = _smol_like()
    arch = spec.architecture
    assert solve_shape(arch, small, spec.shape, arch.num_params(small)) == small
    assert solve_shape(arch, small, spec.shape, spec.num_params) == spec.shape


def test_size_outside_range_names_the_range():
    spec, small = _smol_like()
    with pytest.raises(ShapeError, match=r"outside the anchors' range \[50\.35M, 134\.52M\]"):
        solve_shape(spec.architecture, small, spec.shape, 200_000_000)


def test_shape_validation_messages():
    spec, small = _smol_like()
    with pytest.raises(ShapeError, match="multiple of num_kv_heads"):
        Shape.from_dict({**small.to_dict(), "num_heads": 7})
    with pytest.raises(ShapeError, match="vocab_size must equal the chain's"):
        Shape.from_dict({**small.to_dict(), "vocab_size": 100}, chain=spec.shape)
    with pytest.raises(ShapeError, match="unknown fields"):
        Shape.from_dict({**small.to_dict(), "layers": 3})
    axes = {k: v for k, v in small.to_dict().items() if k not in ("vocab_size", "max_position_embeddings",
                                                                    "tie_word_embeddings")}
    assert Shape.from_dict({**axes, "vocab_size": None}, chain=spec.shape).vocab_size == spec.shape.vocab_size
    with pytest.raises(ShapeError, match="missing"):
        Shape.from_dict({**axes, "num_layers": None}, chain=spec.shape)


def test_shapes_module_does_not_import_torch():
    code = ("import sys, cbd_engine.spec.shapes, cbd_engine.spec.families, cbd_engine.data.rows; "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
           "max_position_embeddings": 8192, "tie_word_embeddings": True}


def test_derived_anchor_shapes_cut_the_ffn_first_then_every_width():
    from cbd_engine.spec.shapes import solve_derived_shape

    spec = ModelSpec.from_config(SMOLLM2)
    arch, source = spec.architecture, spec.shape
    near = solve_derived_shape(arch, source, 100_000_000)  # within the FFN's half: the FFN alone moves
    assert (near.hidden_size, near.num_heads, near.num_layers) == (576, 9, 30) and near.intermediate_size < 1536
    far = solve_derived_shape(arch, source, 70_000_000)  # past it: the FFN at most half, then hidden and heads too
    assert far.intermediate_size <= 768 and far.hidden_size < 576 and far.num_layers == 30
    uniform = solve_derived_shape(arch, source, 100_000_000, order="uniform")  # the one-fraction rule
    assert uniform.hidden_size < 576 and uniform.intermediate_size > near.intermediate_size
    for shape, target in ((near, 100e6), (far, 70e6), (uniform, 100e6)):
        assert abs(arch.num_params(shape) - target) <= 0.03 * target
    with pytest.raises(ShapeError, match="above the anchor"):
        solve_derived_shape(arch, source, 200_000_000)
    with pytest.raises(ShapeError, match="prune_order"):
        solve_derived_shape(arch, source, 100_000_000, order="depth")
