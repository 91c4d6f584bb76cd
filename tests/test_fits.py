"""The budget rule (cbd_engine/spec/fits.py), torch-free: the largest shape of a chain whose GGUF file plus KV cache
fits, against an independent scan of the size rule's shapes."""

from dataclasses import replace

import pytest

from cbd_engine.spec.export import device_bytes
from cbd_engine.spec.families import ModelSpec
from cbd_engine.spec.fits import Budget, BudgetError, candidates, fit_budget, parse_memory, path_shapes
from cbd_engine.spec.shapes import Shape, ShapeError, interpolate_shape, solve_derived_shape

SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
           "max_position_embeddings": 8192, "tie_word_embeddings": True}
TOKENIZER = 1_767_810  # what SmolLM2's tokenizer.json adds to a GGUF file (tests/test_export.py checks the count)
SPEC = ModelSpec.from_config(SMOLLM2)
ARCH, SOURCE = SPEC.architecture, SPEC.shape
DEMO_ANCHOR = solve_derived_shape(ARCH, SOURCE, 90_000_000)  # the demo chain's (worker/demo.py): the FFN cut
NARROW = Shape(num_layers=20, hidden_size=384, num_heads=6, num_kv_heads=2, head_dim=64, intermediate_size=1024,
               vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True)


def total(shape: Shape, budget: Budget) -> int:
    return device_bytes(ARCH, shape, budget.fmt, budget.quant, budget.context, TOKENIZER).total


def sampled_shapes(small: Shape, large: Shape, steps: int = 4000) -> set[Shape]:
    """The size rule's shapes from a plain grid of t: an independent look at what path_shapes walks."""
    return {interpolate_shape(ARCH, small, large, i / steps) for i in range(steps + 1)}


def test_memory_strings_are_decimal_or_binary_bytes():
    assert parse_memory("300MB") == 300_000_000 == parse_memory(300_000_000) == parse_memory("300 mb")
    assert parse_memory("1.5GiB") == 1_610_612_736 and parse_memory("64KiB") == 65536 and parse_memory("2KB") == 2000
    assert parse_memory("123") == 123
    for bad in ("300XB", "abc", "-5MB", 0, True, "1e9", ""):
        with pytest.raises(ShapeError):
            parse_memory(bad)


def test_path_shapes_are_every_shape_the_size_rule_moves_through():
    walked = path_shapes(ARCH, NARROW, SOURCE)
    assert set(walked) == sampled_shapes(NARROW, SOURCE)
    assert walked[0] == NARROW and walked[-1] == SOURCE
    params = [ARCH.num_params(s) for s in walked]
    assert params == sorted(params) and len(set(params)) == len(params)


@pytest.mark.parametrize(("memory", "context"), [("290MB", 8192), ("300MB", 8192), ("330MB", 8192),
                                                  ("160MB", 2048), ("175MB", 2048)])
def test_the_largest_shape_that_fits_and_the_next_larger_does_not(memory, context):
    budget = Budget(parse_memory(memory), "gguf", "Q8_0", context)
    fit = fit_budget(ARCH, [SOURCE, DEMO_ANCHOR], budget, TOKENIZER)
    chosen, larger = fit.chosen, fit.next_larger
    assert total(chosen.shape, budget) == chosen.bytes.total <= budget.memory
    assert larger is not None and total(larger.shape, budget) > budget.memory and larger.params > chosen.params
    assert not fit.ceiling and fit.note(budget) is None
    # no shape the size rule can make between the anchors is larger and fits
    fitting = [s for s in sampled_shapes(DEMO_ANCHOR, SOURCE) if total(s, budget) <= budget.memory]
    assert max(ARCH.num_params(s) for s in fitting) == chosen.params


def test_the_demo_budget_lands_between_the_anchors():
    """The README's demo: 300 MB, Q8_0, SmolLM2's whole 8192-token context, on the demo chain (SmolLM2-135M and a
    90M anchor): a model between the two, and the counted terms add up."""
    budget = Budget(300_000_000, "gguf", "Q8_0", 8192)
    fit = fit_budget(ARCH, [SOURCE, DEMO_ANCHOR], budget, TOKENIZER)
    counted = fit.chosen.bytes
    assert ARCH.num_params(DEMO_ANCHOR) < fit.chosen.params < SPEC.num_params
    assert counted.kv_cache == 2 * 30 * 8192 * 3 * 64 * 2
    # llama.cpp's KV cache holds a multiple of 256 cells (1000 tokens: 1024 cells)
    assert device_bytes(ARCH, fit.chosen.shape, "gguf", "Q8_0", 1000, TOKENIZER).kv_cache == 2 * 30 * 1024 * 3 * 64 * 2
    assert counted.total == counted.weights + counted.overhead + counted.kv_cache
    assert sum(t["bytes"] for t in counted.by_type.values()) == counted.weights
    assert counted.fallback("Q8_0") == 0 and set(counted.by_type) == {"Q8_0", "F32"}


def test_a_budget_above_the_largest_anchor_is_the_largest_anchor_said_so():
    budget = Budget(parse_memory("1GB"), "gguf", "Q8_0", 2048)
    fit = fit_budget(ARCH, [SOURCE, DEMO_ANCHOR], budget, TOKENIZER)
    assert fit.chosen.shape == SOURCE and fit.next_larger is None and fit.ceiling
    assert "holds the chain's largest model" in fit.note(budget) and "largest anchor" in fit.note(budget)


def test_a_budget_below_the_smallest_model_states_its_bytes():
    budget = Budget(parse_memory("250MB"), "gguf", "Q8_0", 8192)
    smallest = total(DEMO_ANCHOR, budget)
    with pytest.raises(BudgetError, match=f"below the chain's smallest model: {ARCH.num_params(DEMO_ANCHOR)} "
                                          f"parameters take {smallest} bytes"):
        fit_budget(ARCH, [SOURCE, DEMO_ANCHOR], budget, TOKENIZER)
    assert smallest > budget.memory


def test_round_to_blocks_leaves_no_tensor_in_f16():
    """Between 384 and 576 the size rule's hidden widths (multiples of 72 or 48 with 9 or 6 heads, clamped) are
    mostly not whole 32-weight blocks: their tensors stay F16. Rounded, every candidate is quantized whole."""
    plain = candidates(ARCH, [SOURCE, NARROW], Budget(1, "gguf", "Q8_0", 2048), TOKENIZER)
    assert any(c.bytes.fallback("Q8_0") for c in plain)
    for quant in ("Q8_0", "Q4_0"):
        budget = Budget(parse_memory("120MB"), "gguf", quant, 2048, round_to_blocks=True)
        rounded = candidates(ARCH, [SOURCE, NARROW], budget, TOKENIZER)
        assert rounded and all(c.bytes.fallback(quant) == 0 and "F16" not in c.bytes.by_type for c in rounded)
        assert all(c.shape.hidden_size % 32 == 0 and c.shape.intermediate_size % 32 == 0 for c in rounded)
        fit = fit_budget(ARCH, [SOURCE, NARROW], budget, TOKENIZER)
        assert fit.chosen.bytes.total <= budget.memory < fit.next_larger.bytes.total
    # F16 has no blocks: the option changes nothing
    f16 = Budget(parse_memory("250MB"), "gguf", "F16", 2048, round_to_blocks=True)
    assert fit_budget(ARCH, [SOURCE, NARROW], f16, TOKENIZER) == fit_budget(
        ARCH, [SOURCE, NARROW], Budget(f16.memory, "gguf", "F16", 2048), TOKENIZER)


def test_k_quants_round_to_super_blocks_where_the_heads_allow():
    """Q4_K and Q6_K need rows of 256: SmolLM2's heads (64 wide, 3/6/9 of them) never make the attention output
    256 wide, so its chain has no rounded K-quant shape (and unrounded ones are counted with llama.cpp's
    fallbacks); a chain of 128-wide heads in pairs has one, every tensor of its own type."""
    with pytest.raises(ShapeError, match="whole 256-weight blocks"):
        fit_budget(ARCH, [SOURCE, NARROW], Budget(parse_memory("120MB"), "gguf", "Q4_K", 2048, True), TOKENIZER)
    plain = candidates(ARCH, [SOURCE, NARROW], Budget(1, "gguf", "Q4_K", 2048), TOKENIZER)
    assert all(c.bytes.fallback("Q4_K") and "Q5_0" in c.bytes.by_type for c in plain)
    wide = replace(SOURCE, num_layers=8, hidden_size=1024, num_heads=8, num_kv_heads=2, head_dim=128,
                   intermediate_size=2816)
    narrow = replace(wide, num_layers=6, hidden_size=512, num_heads=4, num_kv_heads=1, intermediate_size=1408)
    for quant in ("Q6_K", "Q4_K"):
        budget = Budget(parse_memory("80MB"), "gguf", quant, 2048, round_to_blocks=True)
        rounded = candidates(ARCH, [wide, narrow], budget, TOKENIZER)
        assert rounded and all(c.bytes.fallback(quant) == 0 for c in rounded)
        assert all(c.shape.hidden_size % 256 == 0 and c.shape.intermediate_size % 256 == 0 for c in rounded)
        fit = fit_budget(ARCH, [wide, narrow], budget, TOKENIZER)
        assert fit.chosen.bytes.total <= budget.memory < fit.next_larger.bytes.total


def test_a_chain_of_three_anchors_is_one_ordered_scan():
    middle = solve_derived_shape(ARCH, SOURCE, 110_000_000)
    budget = Budget(parse_memory("320MB"), "gguf", "Q8_0", 8192)
    fit = fit_budget(ARCH, [SOURCE, middle, DEMO_ANCHOR], budget, TOKENIZER)
    assert fit.chosen.bytes.total <= budget.memory < fit.next_larger.bytes.total
    assert fit.chosen.pair == (0 if fit.chosen.params >= ARCH.num_params(middle) else 1)
    listed = candidates(ARCH, [SOURCE, middle, DEMO_ANCHOR], budget, TOKENIZER)
    assert len({c.shape for c in listed}) == len(listed) and [c.shape for c in listed].count(middle) == 1


def test_only_gguf_is_counted():
    with pytest.raises(ShapeError, match="gguf files only"):
        Budget(10**9, "onnx", "fp32", 2048)
    with pytest.raises(ValueError, match="quant"):
        Budget(10**9, "gguf", "Q3_K", 2048)
