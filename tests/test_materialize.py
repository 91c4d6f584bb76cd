"""The materializer: function-preserving growth, bitwise identities, alignment, baselines, and clean failures."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cbd_cli import main as cbd
from cbd_engine.data.calibration import Calibration, default_calibration
from cbd_engine.materialization.alignment import Assignments
from cbd_engine.materialization.anchor import Anchor, Term
from cbd_engine.materialization.mixing import Pair
from cbd_engine.materialization.planning import ImportanceSource, build_plan, plan_pair
from cbd_engine.materialization.recipe import materialize
from cbd_engine.materialization.stream import iter_tensors, state_dict
from cbd_engine.materialization.transforms import LayerMap, Plan, grown_eps
from cbd_engine.spec.families import ModelSpec, read_config
from cbd_engine.spec.shapes import ShapeError

FAMILIES = ["llama", "llama_untied_bias", "qwen2", "qwen3", "mistral", "gpt2", "gpt_neox"]
IDS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(folder: Path, ids: torch.Tensor = IDS) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def spec_of(folder: Path) -> ModelSpec:
    return ModelSpec.from_config(read_config(folder))


def transformed(term: Term, target) -> dict[str, torch.Tensor]:
    """One anchor transformed by its plan, whole tensors in memory."""
    return state_dict(iter_tensors(lambda spec, name, layer, rows: term.tensor(spec, name, layer, 0, rows), target,
                                   term.anchor))


def mixed(pair: Pair, target, alpha: float) -> dict[str, torch.Tensor]:
    return state_dict(iter_tensors(lambda spec, name, layer, rows: pair.tensor(spec, name, layer, 0, rows).at(alpha),
                                   target, pair.large.anchor))


IMPORTANCE = ImportanceSource(default_calibration())  # what materialize reads when given no calibration


def grown_shapes(spec: ModelSpec) -> dict[str, dict]:
    """Each axis grown alone, and all at once."""
    s = spec.shape
    heads = {"num_kv_heads": 2 * s.num_kv_heads, "num_heads": 2 * s.num_heads}
    if spec.architecture.hidden_follows_heads:
        heads["hidden_size"] = 2 * s.num_heads * s.head_dim
    axes = {"layers": {"num_layers": s.num_layers + 2}, "ffn": {"intermediate_size": s.intermediate_size + 32},
            "heads": heads}
    if not spec.architecture.hidden_follows_heads:
        axes["hidden"] = {"hidden_size": s.hidden_size + 16}
    axes["all"] = {k: v for change in axes.values() for k, v in change.items()}
    return {name: {**s.to_dict(), **change} for name, change in axes.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_growth_keeps_the_function(tiny_model, tmp_path, family):
    source = tiny_model(family)
    reference = logits(source)
    for axis, shape in grown_shapes(spec_of(source)).items():
        out = tmp_path / axis
        materialize(out, large=source, shape=shape, init="single", dtype="float32")
        assert spec_of(out).shape.to_dict() == shape
        torch.testing.assert_close(logits(out), reference, atol=1e-5, rtol=0, msg=f"{family}: growing {axis}")


def test_layernorm_zero_padding_would_not_keep_the_function(tiny_model):
    """The negative control: treat GPT-2's LayerNorm residual as RMSNorm's (zero-padding, no mean) and it breaks."""
    source = tiny_model("gpt2")
    anchor = Anchor.load(source)
    target = replace(anchor.shape, hidden_size=anchor.shape.hidden_size + 32, num_heads=anchor.shape.num_heads + 2,
                     num_kv_heads=anchor.shape.num_heads + 2)
    plan = build_plan(anchor.shape, target, None)
    config = anchor.spec.config_for(target, eps=grown_eps(anchor.spec.eps, plan, target))
    for norm, should_match in (("layernorm", True), ("rmsnorm", False)):
        wrong = Anchor(anchor.path, replace(anchor.spec, architecture=replace(anchor.spec.architecture, norm=norm)))
        model = AutoModelForCausalLM.from_config(type(AutoModelForCausalLM.from_pretrained(source).config)(**config))
        model.load_state_dict(transformed(Term(wrong, plan), target), strict=False)
        model.tie_weights()
        with torch.no_grad():
            got = model.eval()(IDS).logits
        assert torch.allclose(got, logits(source), atol=1e-5) == should_match, norm


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_own_shape_is_a_bitwise_identity(tiny_model, tmp_path, family):
    source = tiny_model(family)
    shape = spec_of(source).shape.to_dict()
    for init, kwargs in (("single", {"large": source}), ("cbd", {"large": source})):
        out = tmp_path / init
        materialize(out, shape=shape, init=init, dtype="float32", **kwargs)
        expected, got = weights(source), weights(out)
        assert got.keys() <= expected.keys()
        for name, tensor in got.items():
            assert torch.equal(tensor, expected[name]), name


def _two_anchors(tiny_model, tmp_path, family="llama"):
    large = tiny_model(family, num_hidden_layers=4, intermediate_size=128)
    s = spec_of(large).shape
    small_shape = {**s.to_dict(), "num_layers": 2, "intermediate_size": 64, "hidden_size": 48,
                   "num_heads": 2, "num_kv_heads": 1}
    small = tmp_path / "small"
    texts = ["the quick brown fox jumps over the lazy dog"] * 4
    materialize(small, large=large, shape=small_shape, dtype="float32", calibration=texts)
    return small, large


def test_paper_mix_at_alpha_one_and_zero_is_the_single_transforms_bitwise(tiny_model, tmp_path):
    small, large = _two_anchors(tiny_model, tmp_path)
    s_small, s_large = Anchor.load(small), Anchor.load(large)
    target = replace(s_large.shape, num_layers=3, intermediate_size=96, hidden_size=56, num_heads=4, num_kv_heads=2)
    target = replace(target, hidden_size=64)
    plan_e, plan_s, alignment = plan_pair(s_small, s_large, target, IMPORTANCE)
    assert alignment["method"] == "lineage"
    for alpha, term in ((1.0, Term(s_small, plan_e)), (0.0, Term(s_large, plan_s))):
        out = tmp_path / f"alpha{alpha}"
        materialize(out, small=small, large=large, shape=target.to_dict(), alpha=alpha, mix="paper", dtype="float32")
        expected = transformed(term, target)
        got = weights(out)
        assert all(torch.equal(got[name], expected[name]) for name in got), alpha
    # E keeps the small anchor's function: alpha 1 is the small anchor, grown
    torch.testing.assert_close(logits(tmp_path / "alpha1.0"), logits(small), atol=1e-5, rtol=0)


def test_unit_mix_at_alpha_zero_is_the_pruned_larger_anchor_and_at_one_the_smaller_anchor(tiny_model, tmp_path):
    small, large = _two_anchors(tiny_model, tmp_path)
    s_small, s_large = Anchor.load(small), Anchor.load(large)
    target = replace(s_large.shape, num_layers=3, intermediate_size=96, hidden_size=64, num_heads=4, num_kv_heads=2)
    _, plan_s, _ = plan_pair(s_small, s_large, target, IMPORTANCE)
    out = tmp_path / "alpha0"
    materialize(out, small=small, large=large, shape=target.to_dict(), alpha=0.0, dtype="float32")
    expected = transformed(Term(s_large, plan_s), target)
    assert all(torch.equal(t, expected[n]) for n, t in weights(out).items())
    out = tmp_path / "alpha1"
    materialize(out, small=small, large=large, shape=spec_of(small).shape.to_dict(), alpha=1.0, dtype="float32")
    expected = weights(small)
    assert all(torch.equal(t, expected[n]) for n, t in weights(out).items())


def test_unit_mix_of_anchors_that_agree_on_their_shared_units_is_the_same_model_at_every_alpha(tiny_model, tmp_path):
    """The small anchor is a pure prune of the large one: on every unit both have, they hold the same weights. The
    unit mix then gives one model at every alpha; the paper's Eq. 3 scales the units only the large anchor has by
    (1 - alpha) and mixes in E's fill, so its outputs move with alpha (the negative control)."""
    small, large = _two_anchors(tiny_model, tmp_path)
    s_small, s_large = Anchor.load(small), Anchor.load(large)
    target = replace(s_large.shape, num_layers=3, intermediate_size=96, hidden_size=56, num_heads=4, num_kv_heads=2)
    plan_e, plan_s, _ = plan_pair(s_small, s_large, target, IMPORTANCE)
    unit, paper = (Pair(Term(s_small, plan_e), Term(s_large, plan_s), mix) for mix in ("unit", "paper"))
    reference = mixed(unit, target, 0.0)
    for alpha in (0.25, 0.5, 1.0):
        assert all(torch.equal(t, reference[n]) for n, t in mixed(unit, target, alpha).items()), alpha
    out = {}
    for mix in ("unit", "paper"):
        out[mix] = tmp_path / mix
        materialize(out[mix], small=small, large=large, shape=target.to_dict(), alpha=0.75, mix=mix, dtype="float32")
    zero = tmp_path / "zero"
    materialize(zero, small=small, large=large, shape=target.to_dict(), alpha=0.0, dtype="float32")
    torch.testing.assert_close(logits(out["unit"]), logits(zero), atol=0, rtol=0)
    assert not torch.allclose(logits(out["paper"]), logits(zero), atol=1e-3)
    assert paper.mix == "paper"


def test_lineage_alignment_keeps_the_units_the_small_anchor_came_from(tiny_model, tmp_path):
    small, large = _two_anchors(tiny_model, tmp_path)
    lineage = json.loads((small / "cbd.json").read_text())["lineage"]["plan"]
    # at the small anchor's own shape, S(large) keeps exactly the small anchor's units: it is the small anchor
    out = tmp_path / "s-at-small"
    materialize(out, small=small, large=large, shape=spec_of(small).shape.to_dict(), alpha=0.0, dtype="float32")
    terms = {term["role"]: term for term in json.loads((out / "cbd.json").read_text())["terms"]}
    assert terms["large"]["plan"]["residual"] == lineage["residual"]
    expected = weights(small)
    assert all(torch.equal(t, expected[n]) for n, t in weights(out).items())


def test_hungarian_alignment_recovers_an_anchor_without_lineage(tiny_model, tmp_path):
    """A function-identical copy of the small anchor with every unit permuted and no cbd.json, as a public checkpoint
    would come: weight-similarity alignment must mix it exactly as lineage alignment mixes the original.
    (Layers are cut evenly here, so relative depth, the alignment's rule for layers, is also the lineage.)"""
    large = tiny_model("llama", num_hidden_layers=4, intermediate_size=128)
    small = tmp_path / "small"
    materialize(small, large=large, dtype="float32", shape={**spec_of(large).shape.to_dict(), "num_layers": 2,
                "intermediate_size": 64, "hidden_size": 48, "num_heads": 2, "num_kv_heads": 1}, importance="magnitude")
    anchor = Anchor.load(small)
    shape = anchor.shape
    generator = torch.Generator().manual_seed(1)

    def perm(n: int) -> list[int]:
        return torch.randperm(n, generator=generator).tolist()

    layers = []
    for i in range(shape.num_layers):
        kv = perm(shape.num_kv_heads)
        heads = [g * shape.group_size + h for g in kv for h in perm(shape.group_size)]
        layers.append(LayerMap(i, False, heads, kv, perm(shape.intermediate_size)))
    permuted = tmp_path / "permuted"
    model = AutoModelForCausalLM.from_pretrained(small)
    model.load_state_dict(transformed(Term(anchor, Plan(perm(shape.hidden_size), layers)), shape), strict=False)
    model.tie_weights()
    model.save_pretrained(permuted)
    torch.testing.assert_close(logits(permuted), logits(small), atol=1e-5, rtol=0)

    target = spec_of(large).shape.to_dict()  # S keeps every unit, so only E's placement decides the mix
    by_lineage = materialize(tmp_path / "lineage", small=small, large=large, shape=target, alpha=0.5, mix="paper")
    by_weights = materialize(tmp_path / "hungarian", small=permuted, large=large, shape=target, alpha=0.5,
                             mix="paper")
    assert by_lineage.provenance["alignment"]["method"] == "lineage"
    assert by_weights.provenance["alignment"]["method"] == "hungarian"
    assert by_weights.provenance["alignment"]["assignments"] > 0
    # a lineage recorded against other weights is not trusted
    other = tiny_model("llama", seed=5, num_hidden_layers=4, intermediate_size=128)
    result = materialize(tmp_path / "other", small=small, large=other, shape=target, alpha=0.5, mix="paper")
    assert result.provenance["alignment"]["method"] == "hungarian"
    torch.testing.assert_close(logits(tmp_path / "hungarian"), logits(tmp_path / "lineage"), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("rows", "columns"), [(6, 6), (4, 7), (7, 4)])
def test_an_assignment_is_solved_only_when_best_matches_collide(rows: int, columns: int) -> None:
    """Units already in correspondence are paired without a solve, with the solver's own answer; units whose best
    matches collide are solved."""
    from scipy.optimize import linear_sum_assignment

    def solver(similarity: torch.Tensor) -> list[int]:
        placed = [-1] * columns
        for row, col in zip(*linear_sum_assignment(similarity.numpy(), maximize=True), strict=True):
            placed[col] = int(row)
        return placed

    generator = torch.Generator().manual_seed(rows * columns)
    noise = 0.1 * torch.rand(rows, columns, generator=generator)
    order = torch.randperm(max(rows, columns), generator=generator)
    matched = noise + torch.eye(max(rows, columns))[order][:rows, :columns]  # each unit of the smaller side: its own
    colliding = noise.clone()
    if rows <= columns:
        colliding[:, 0] += 1.0  # every row's best column is column 0
    else:
        colliding[0, :] += 1.0  # every column's best row is row 0
    for similarity, solves in ((matched, 0), (colliding, 1)):
        assignments = Assignments()
        placed = assignments.assign(similarity)
        assert assignments.made == 1 and assignments.solved == solves
        assert placed == solver(similarity)


def test_align_none_is_a_positional_merge_and_lineage_must_exist(tiny_model, tmp_path):
    first, second = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    shape = spec_of(first).shape.to_dict()
    out = tmp_path / "merge"
    materialize(out, small=first, large=second, shape=shape, alpha=0.25, align="none", dtype="float32")
    a, b, got = weights(first), weights(second), weights(out)
    assert all(torch.allclose(got[n], 0.25 * a[n] + 0.75 * b[n], atol=1e-7) for n in got)
    with pytest.raises(ValueError, match="records no lineage"):
        materialize(tmp_path / "x", small=first, large=second, shape=shape, align="lineage")
    _assert_nothing_written(tmp_path / "x")


def test_activation_importance_is_computed_once_per_anchor_and_calibration(tiny_model, tmp_path, monkeypatch):
    import cbd_engine.materialization.importance as importance

    monkeypatch.setenv("CBD_CACHE_DIR", str(tmp_path / "cache"))
    large = tiny_model("llama")
    shape = {**spec_of(large).shape.to_dict(), "intermediate_size": 64}
    texts = ["some calibration text", "and another one"]
    first = materialize(tmp_path / "a", large=large, shape=shape, calibration=texts, dtype="float32")

    def forbidden(*args, **kwargs):
        raise AssertionError("the forward pass ran again")

    monkeypatch.setattr(importance, "activation_importance", forbidden)
    second = materialize(tmp_path / "b", large=large, shape=shape, calibration=texts, dtype="float32")
    assert [f.sha256 for f in first.files if f.name == "model.safetensors"] == \
        [f.sha256 for f in second.files if f.name == "model.safetensors"]
    with pytest.raises(AssertionError, match="ran again"):  # other texts are another key
        materialize(tmp_path / "c", large=large, shape=shape, calibration=texts[:1], dtype="float32")


def test_calibration_longer_than_the_models_positions_is_cut_to_them(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("CBD_CACHE_DIR", str(tmp_path / "cache"))
    large = tiny_model("gpt2")  # learned position embeddings: 64 positions, no more
    shape = {**spec_of(large).shape.to_dict(), "intermediate_size": 64}
    result = materialize(tmp_path / "small", large=large, shape=shape, calibration=["x" * 500], dtype="float32")
    assert result.provenance["importance"]["kind"] == "activation"


def test_proportional_alpha(tiny_model, tmp_path):
    small, large = _two_anchors(tiny_model, tmp_path)
    p_small, p_large = spec_of(small).num_params, spec_of(large).num_params
    out = tmp_path / "mid"
    result = materialize(out, small=small, large=large, size=(p_small + p_large) // 2, alpha="proportional",
                         dtype="float32", quality=True)
    assert result.alpha == pytest.approx((p_large - result.params) / (p_large - p_small))
    assert p_small < result.params < p_large and result.params == spec_of(out).num_params
    provenance = json.loads((out / "cbd.json").read_text())
    assert provenance["alignment"]["method"] == "lineage" and provenance["alpha"] == result.alpha
    assert provenance["mix"] == "unit" and provenance["alpha_search"] == {"requested": "proportional"}
    assert [a["role"] for a in provenance["anchors"]] == ["small", "large"]
    quality = provenance["quality"]  # a requested alpha is scored on the dev rows when asked, beside alpha 0
    assert quality["dev_rows"] == 32 and quality["dev_loss"] > 0 and quality["alpha_0_dev_loss"] > 0
    assert quality["worse_than_alpha_0"] == (quality["dev_loss"] > quality["alpha_0_dev_loss"])
    unscored = materialize(tmp_path / "fast", small=small, large=large, size=(p_small + p_large) // 2,
                           alpha="proportional", dtype="float32")  # by default a given alpha costs no forward pass
    assert unscored.provenance["quality"] is None


def test_exact_auto_alpha_picks_the_best_of_a_grid_with_both_ends(tiny_model, tmp_path):
    small, large = _two_anchors(tiny_model, tmp_path)
    result = materialize(tmp_path / "auto", small=small, large=large, shape={**spec_of(large).shape.to_dict(),
                         "num_layers": 3}, dtype="float32", alpha_search="exact")
    search = result.provenance["alpha_search"]
    assert search["method"] == "grid" and search["knots"] == []
    grid = {float(alpha): loss for alpha, loss in search["grid"].items()}
    assert {0.0, 0.25, 0.5, 0.75, 1.0} <= set(grid) and len(grid) in (6, 7)
    assert result.alpha == min(grid, key=grid.get) and search["dev_loss"] == grid[result.alpha]
    assert result.provenance["alphas"] == dict.fromkeys(("attention", "mlp", "embeddings_norms"), result.alpha)
    assert not result.provenance["quality"]["worse_than_alpha_0"]
    # the dev loss recorded is the written model's own (scored again from the files)
    from cbd_engine.materialization.alpha_search import dev_examples
    from cbd_engine.nn.loading import load_model, load_tokenizer
    from cbd_engine.nn.validation import examples_loss

    tokenizer = load_tokenizer(tmp_path / "auto")
    loss = examples_loss(load_model(tmp_path / "auto"), dev_examples(tokenizer, default_calibration()),
                         tokenizer.pad_token_id)
    assert loss == pytest.approx(search["dev_loss"], abs=1e-4)


def test_auto_alpha_is_interpolated_between_the_pairs_knots_searched_once(tiny_model, tmp_path, monkeypatch):
    """The default: the grid runs at three sizes between the anchors, each once (cached) and only when a size
    beside it is asked for; any size on the size rule's path takes the alpha interpolated between the knots' best,
    through alpha 1 at the smaller anchor and 0 at the larger; at a knot's own size that is the grid's choice there."""
    from cbd_engine.materialization import alpha_search
    from cbd_engine.materialization.alpha_search import interpolate_alpha

    monkeypatch.setenv("CBD_CACHE_DIR", str(tmp_path / "cache"))
    small, large = _two_anchors(tiny_model, tmp_path)
    p_small, p_large = spec_of(small).num_params, spec_of(large).num_params
    searches = []
    original = alpha_search.search_alpha
    monkeypatch.setattr(alpha_search, "search_alpha", lambda *a, **k: searches.append(a[1]) or original(*a, **k))
    first = materialize(tmp_path / "first", small=small, large=large, size=p_small + (p_large - p_small) // 3,
                        dtype="float32")
    search = first.provenance["alpha_search"]
    assert search["method"] == "knots" and first.provenance["quality"] is None  # no dev pass at this size
    knots = search["knots"]  # the one or two knots beside the size, the only ones searched
    assert 1 <= len(searches) <= 2 and [k["params"] for k in knots] == [
        spec_of(large).architecture.num_params(shape) for shape in searches]
    assert p_small < knots[0]["params"] <= first.params <= knots[-1]["params"] < p_large
    for knot in knots:  # each knot is a grid with both ends, and its alpha that grid's best
        grid = {float(a): loss for a, loss in knot["grid"].items()}
        assert {0.0, 0.25, 0.5, 0.75, 1.0} <= set(grid) and knot["alpha"] == min(grid, key=lambda a: (grid[a], a))
        assert knot["fraction"] == pytest.approx((knot["params"] - p_small) / (p_large - p_small))
    fraction = (first.params - p_small) / (p_large - p_small)
    assert first.alpha == interpolate_alpha([(k["fraction"], k["alpha"]) for k in knots], fraction)
    assert first.provenance["alphas"] == dict.fromkeys(("attention", "mlp", "embeddings_norms"), first.alpha)

    searches.clear()  # another size of the same pair: the knots come from the cache, no dev pass at all
    second = materialize(tmp_path / "second", small=small, large=large, size=knots[0]["params"], dtype="float32",
                         quality=True)
    assert searches == [] and second.provenance["alpha_search"]["knots"] == [knots[0]]
    assert second.alpha == knots[0]["alpha"]  # at a knot's size: that knot's best
    assert second.provenance["quality"]["dev_loss"] == pytest.approx(knots[0]["dev_loss"], abs=1e-5)
    exact = materialize(tmp_path / "exact", small=small, large=large, size=knots[0]["params"], dtype="float32",
                        alpha_search="exact")
    assert exact.alpha == knots[0]["alpha"] and exact.provenance["alpha_search"]["method"] == "grid"


def test_an_interpolated_alpha_that_loses_to_alpha_0_when_scored_gives_way_to_it(tiny_model, tmp_path, monkeypatch):
    from cbd_engine.materialization.alpha_search import Candidates

    monkeypatch.setenv("CBD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(Candidates, "dev_loss", lambda self, alphas: 1.0 + alphas["mlp"])  # alpha 0 is best
    small, large = _two_anchors(tiny_model, tmp_path)
    p_small, p_large = spec_of(small).num_params, spec_of(large).num_params
    size = p_small + (p_large - p_small) // 8  # between the smaller anchor's alpha 1 and the first knot's 0
    fast = materialize(tmp_path / "fast", small=small, large=large, size=size, dtype="float32")
    assert fast.alpha > 0 and fast.provenance["quality"] is None  # not scored: the interpolation stands
    scored = materialize(tmp_path / "scored", small=small, large=large, size=size, dtype="float32", quality=True)
    search, quality = scored.provenance["alpha_search"], scored.provenance["quality"]
    assert scored.alpha == 0.0 and search["fallback"] == {"alpha": fast.alpha, "dev_loss": 1.0 + fast.alpha}
    assert quality["dev_loss"] == quality["alpha_0_dev_loss"] == 1.0 and not quality["worse_than_alpha_0"]
    materialize(tmp_path / "zero", small=small, large=large, size=size, dtype="float32", alpha=0.0)
    written, zero = weights(tmp_path / "scored"), weights(tmp_path / "zero")  # the files are alpha 0's
    assert written.keys() == zero.keys() and all(torch.equal(written[k], zero[k]) for k in zero)


def test_knots_interpolate_linearly_through_the_anchors_own_ends():
    from cbd_engine.materialization.alpha_search import bracketing, interpolate_alpha

    shapes = [(0.25, "a", 1), (0.5, "b", 2), (0.75, "c", 3)]
    assert bracketing(shapes, 0.3) == shapes[:2] and bracketing(shapes, 0.5) == [shapes[1]]
    assert bracketing(shapes, 0.1) == [shapes[0]] and bracketing(shapes, 0.9) == [shapes[2]]

    knots = [(0.25, 0.875), (0.5, 0.5), (0.75, 0.25)]
    assert interpolate_alpha(knots, 0.0) == 1.0 and interpolate_alpha(knots, 1.0) == 0.0
    assert interpolate_alpha(knots, 0.5) == 0.5 and interpolate_alpha(knots, 0.625) == 0.375
    assert interpolate_alpha(knots, 0.125) == pytest.approx(0.9375)


def test_a_shape_off_the_size_rules_path_gets_the_grid_at_its_own_size(tiny_model, tmp_path):
    small, large = _two_anchors(tiny_model, tmp_path)
    shape = {**spec_of(large).shape.to_dict(), "intermediate_size": 96}  # not a shape the size rule gives
    result = materialize(tmp_path / "off", small=small, large=large, shape=shape, dtype="float32")
    search = result.provenance["alpha_search"]
    assert search["method"] == "grid" and len(search["grid"]) in (6, 7) and search["knots"] == []


def test_per_module_refinement_is_kept_only_when_it_beats_the_grid(tiny_model, tmp_path):
    small, large = _two_anchors(tiny_model, tmp_path)
    result = materialize(tmp_path / "refined", small=small, large=large, dtype="float32", refine_steps=3,
                         shape={**spec_of(large).shape.to_dict(), "num_layers": 3})
    search = result.provenance["alpha_search"]
    refined = search["refined"]
    assert refined["steps"] == 3 and set(refined["alphas"]) == {"attention", "mlp", "embeddings_norms"}
    assert refined["kept"] == (refined["dev_loss"] < search["grid"][f"{result.alpha:g}"])
    assert result.provenance["alphas"] == (refined["alphas"] if refined["kept"] else
                                           dict.fromkeys(refined["alphas"], result.alpha))


def test_calibration_comes_from_the_request_the_anchors_or_the_package(tiny_model, tmp_path, monkeypatch):
    """Nothing is pruned by magnitude unless asked by name: without calibration text the anchor's own
    calibration.json is read, and without one the package's default set."""
    monkeypatch.setenv("CBD_CACHE_DIR", str(tmp_path / "cache"))
    large = tiny_model("llama")
    shape = {**spec_of(large).shape.to_dict(), "intermediate_size": 64}
    result = materialize(tmp_path / "default", large=large, shape=shape, dtype="float32")
    assert result.provenance["importance"] == {"kind": "activation", "calibration": "default", "rows": 256}
    own = Calibration.from_texts([f"text number {i} about anchors" for i in range(40)], source="the chain's rows")
    own.save(large)
    result = materialize(tmp_path / "own", large=large, shape=shape, dtype="float32")
    assert result.provenance["importance"]["calibration"] == "the chain's rows"
    result = materialize(tmp_path / "magnitude", large=large, shape=shape, dtype="float32", importance="magnitude")
    assert result.provenance["importance"] == {"kind": "magnitude"}
    assert not (tmp_path / "own" / "calibration.json").exists()  # the chain's rows stay with its anchors


def test_gpt2_head_subset_equals_index_select_of_the_kept_heads(tiny_model, tmp_path):
    """The semantics of transformers 4.x `prune_heads`: keep heads' slices of c_attn's q, k, v and c_proj's rows."""
    source = tiny_model("gpt2")
    s = spec_of(source).shape
    d, hd = s.hidden_size, s.head_dim
    target = {**s.to_dict(), "num_heads": 2, "num_kv_heads": 2, "hidden_size": d}
    with pytest.raises(ShapeError):  # GPT-2 ties hidden to heads
        materialize(tmp_path / "bad", large=source, shape=target, dtype="float32")
    out = tmp_path / "subset"
    materialize(out, large=source, shape={**target, "hidden_size": 2 * hd}, dtype="float32")
    plan = json.loads((out / "cbd.json").read_text())["lineage"]["plan"]
    src, got = weights(source), weights(out)
    channels = torch.tensor(plan["residual"])
    for layer, kept in enumerate(plan["layers"]):
        heads = torch.tensor(kept["heads"])
        cols = (heads[:, None] * hd + torch.arange(hd)).reshape(-1)
        qkv_cols = torch.cat([cols, cols + d, cols + 2 * d])
        c_attn = src[f"h.{layer}.attn.c_attn.weight"] if f"h.{layer}.attn.c_attn.weight" in src else \
            src[f"transformer.h.{layer}.attn.c_attn.weight"]
        prefix = f"transformer.h.{kept['source']}"
        c_attn = src[f"{prefix}.attn.c_attn.weight"]
        assert torch.equal(got[f"transformer.h.{layer}.attn.c_attn.weight"], c_attn[channels][:, qkv_cols])
        assert torch.equal(got[f"transformer.h.{layer}.attn.c_attn.bias"], src[f"{prefix}.attn.c_attn.bias"][qkv_cols])
        c_proj = src[f"{prefix}.attn.c_proj.weight"]
        assert torch.equal(got[f"transformer.h.{layer}.attn.c_proj.weight"], c_proj[cols][:, channels])


def test_reload_matches_in_memory_tied_and_deterministic(tiny_model, tmp_path):
    small, large = _two_anchors(tiny_model, tmp_path)
    target = {**spec_of(large).shape.to_dict(), "num_layers": 3, "intermediate_size": 96}
    first = materialize(tmp_path / "a", small=small, large=large, shape=target, alpha=0.4, dtype="float32")
    second = materialize(tmp_path / "b", small=small, large=large, shape=target, alpha=0.4, dtype="float32")
    assert {f.name: f.sha256 for f in first.files if f.name != "cbd.json"} == \
        {f.name: f.sha256 for f in second.files if f.name != "cbd.json"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "lm_head.weight" not in weights(tmp_path / "a")
    s_small, s_large = Anchor.load(small), Anchor.load(large)
    plan_e, plan_s, _ = plan_pair(s_small, s_large, first.shape, IMPORTANCE)
    in_memory = AutoModelForCausalLM.from_config(model.config)
    in_memory.load_state_dict(mixed(Pair(Term(s_small, plan_e), Term(s_large, plan_s), "unit"), first.shape, 0.4),
                              strict=False)
    in_memory.tie_weights()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(IDS).logits, in_memory.eval()(IDS).logits, atol=0, rtol=0)
    for layer in json.loads((tmp_path / "a" / "cbd.json").read_text())["terms"][1]["plan"]["layers"]:
        for position, head in enumerate(layer["heads"]):  # query heads stay with their KV head
            assert head == -1 or head // 2 == layer["kv_heads"][position // 2]


def test_every_init_is_the_materializer_s_own_or_a_registered_baseline():
    from cbd_engine.materialization.baselines import BASELINES
    from cbd_engine.spec.options import INITS

    assert sorted({"cbd", "single", *BASELINES}) == sorted(INITS)


def test_random_and_learngene_baselines(tiny_model, tmp_path):
    large = tiny_model("llama", num_hidden_layers=6)
    shape = {**spec_of(large).shape.to_dict(), "num_layers": 5}
    src = weights(large)
    for init, copied in (("learngene_auto", {0: 0, 1: 1, 2: 2}), ("learngene_van", {2: 3, 3: 4, 4: 5})):
        out = tmp_path / init
        materialize(out, large=large, shape=shape, init=init, dtype="float32", seed=1)
        got = weights(out)
        for target_layer, source_layer in copied.items():
            name = "model.layers.{}.mlp.down_proj.weight"
            assert torch.equal(got[name.format(target_layer)], src[name.format(source_layer)])
        random_layer = ({0, 1, 2, 3, 4} - set(copied)).pop()
        assert not torch.equal(got[f"model.layers.{random_layer}.mlp.down_proj.weight"],
                               src[f"model.layers.{random_layer}.mlp.down_proj.weight"])
    materialize(tmp_path / "r1", large=large, shape=shape, init="random", seed=3, dtype="float32")
    materialize(tmp_path / "r2", large=large, shape=shape, init="random", seed=3, dtype="float32")
    assert (tmp_path / "r1/model.safetensors").read_bytes() == (tmp_path / "r2/model.safetensors").read_bytes()


def test_learngene_reaches_a_size_by_depth_at_the_anchors_width(tiny_model, tmp_path):
    large = tiny_model("llama", num_hidden_layers=6)
    spec = spec_of(large)
    size = int(0.8 * spec.num_params)  # the size solver reaches it by width only
    assert materialize(tmp_path / "cbd", large=large, size=size, dtype="float32").shape.num_layers == 6
    result = materialize(tmp_path / "lg", large=large, size=size, init="learngene_auto", dtype="float32")
    assert result.shape.hidden_size == spec.shape.hidden_size and result.shape.num_layers < 6
    per_layer = spec.architecture.num_params(replace(spec.shape, num_layers=2)) - \
        spec.architecture.num_params(replace(spec.shape, num_layers=1))
    assert abs(result.params - size) <= per_layer / 2


def test_sharded_output_and_dtypes(tiny_model, tmp_path):
    source = tiny_model("llama")
    shape = spec_of(source).shape.to_dict()
    out = tmp_path / "sharded"
    result = materialize(out, large=source, shape=shape, init="single", dtype="float32", max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    assert {f.name for f in result.files} >= {"config.json", "cbd.json", "model.safetensors.index.json"}
    torch.testing.assert_close(logits(out), logits(source), atol=0, rtol=0)
    for info in result.files:  # sizes and sha256 as the hashing thread saw the bytes the writing thread wrote
        data = (out / info.name).read_bytes()
        assert (info.size, info.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    materialize(tmp_path / "bf16", large=source, shape=shape, init="single", dtype="bfloat16")
    assert {t.dtype for t in weights(tmp_path / "bf16").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_bfloat16_anchor_is_cut_in_its_own_dtype_to_the_bits_of_the_float32_path(tiny_model, tmp_path):
    """A prune only selects rows, which is exact in any dtype: cutting a bfloat16 anchor (no float32 copy) writes
    what cutting its exact float32 copy writes, whatever the output dtype; growth still fills in float32."""
    source = tiny_model("llama")
    shape = spec_of(source).shape.to_dict()
    stored = {"bfloat16": tmp_path / "bf16", "float32": tmp_path / "f32"}
    materialize(stored["bfloat16"], large=source, shape=shape, init="single", dtype="bfloat16")
    materialize(stored["float32"], large=stored["bfloat16"], shape=shape, init="single", dtype="float32")
    cut = {**shape, "hidden_size": 48, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}
    grown = {**shape, "intermediate_size": 128}
    for out_dtype in ("bfloat16", "float32"):
        for name, target in (("cut", cut), ("grown", grown)):
            made = {anchor: materialize(tmp_path / f"{name}-{anchor}-{out_dtype}", large=folder, shape=target,
                                        importance="magnitude", dtype=out_dtype)
                    for anchor, folder in stored.items()}
            assert made["bfloat16"].provenance["terms"] == [
                {**made["float32"].provenance["terms"][0], "anchor": str(stored["bfloat16"])}]
            first, second = (weights(result.out) for result in made.values())
            assert first.keys() == second.keys()
            assert all(torch.equal(first[k], second[k]) and first[k].dtype == second[k].dtype for k in first)


def test_magnitude_importance_reads_only_the_tensors_of_the_axes_a_cut_shrinks(tiny_model, monkeypatch):
    from cbd_engine.io.checkpoint import SafetensorsReader
    from cbd_engine.materialization.importance import magnitude_importance
    from cbd_engine.spec.families import FFN

    folder = tiny_model("llama")
    spec = spec_of(folder)
    full = magnitude_importance(folder, spec)
    read, reader_read = [], SafetensorsReader.read
    monkeypatch.setattr(SafetensorsReader, "read", lambda self, name, rows=None: read.append(name) or
                        reader_read(self, name, rows))
    target = replace(spec.shape, intermediate_size=64)  # an FFN-only cut
    ffn_only = ImportanceSource(default_calibration(), "magnitude")(Anchor.load(folder), target)
    assert ffn_only.ffn == full.ffn and (ffn_only.residual, ffn_only.heads) == (None, None)
    assert read and {name.rsplit(".", 2)[-2] for name in read} == {"gate_proj", "up_proj", "down_proj"}
    assert magnitude_importance(folder, spec, (FFN,)).ffn == full.ffn


def test_a_write_that_fails_in_the_writing_thread_fails_the_materialization_and_leaves_nothing(
        tiny_model, tmp_path, monkeypatch):
    import threading

    from cbd_engine.io.checkpoint import StreamingWriter

    source = tiny_model("llama")

    def full_disk(self, kind, payload):
        if kind == "data":
            raise OSError(28, "No space left on device")
        return writes(self, kind, payload)

    writes = StreamingWriter._write_message
    monkeypatch.setattr(StreamingWriter, "_write_message", full_disk)
    threads = threading.active_count()
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        materialize(out, large=source, shape=spec_of(source).shape.to_dict(), init="single", dtype="float32")
    _assert_nothing_written(out)
    assert threading.active_count() == threads  # the hashing and writing threads have ended


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def test_bad_input_writes_nothing_and_says_what_is_wrong(tiny_model, tmp_path):
    llama, gpt2 = tiny_model("llama"), tiny_model("gpt2")
    other_vocab = tiny_model("llama", vocab_size=101)
    small, large = _two_anchors(tiny_model, tmp_path)
    out = tmp_path / "out"
    shape = spec_of(llama).shape.to_dict()
    cases = [
        (dict(small=small, large=large, size="10G"), ShapeError, r"outside the anchors' range \["),
        (dict(small=gpt2, large=llama, size="1M"), ShapeError, "architecture"),
        (dict(small=other_vocab, large=llama, size="1M"), ShapeError, "vocab_size"),
        (dict(large=llama, shape={**shape, "head_dim": 8}), ShapeError, "head_dim"),
        (dict(large=llama, shape={**shape, "num_heads": 3}), ShapeError, "multiple of num_kv_heads"),
        (dict(large=tmp_path / "missing", size="1M"), FileNotFoundError, "not a folder"),
        (dict(large=llama, shape=shape, alpha=1.5, small=llama), ValueError, r"alpha must be in \[0, 1\]"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            materialize(out, dtype="float32", **kwargs)
        _assert_nothing_written(out)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((llama / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes((llama / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a safetensors file|truncated"):
        materialize(out, large=corrupt, shape=shape, init="single")
    _assert_nothing_written(out)


def test_cli_inspect_json_feeds_materialize_shape(tiny_model, tmp_path, capsys):
    source = tiny_model("qwen3")
    assert cbd(["inspect", str(source), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "llama" and info["params"] == spec_of(source).num_params
    out = tmp_path / "copy"
    assert cbd(["materialize", "--large", str(source), "--shape", json.dumps(info["shape"]), "--dtype", "float32",
                "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["params"] == info["params"]
    assert cbd(["materialize", "--large", str(source), "--size", "999G", "--out", str(tmp_path / "x")]) == 2
    assert "above the only anchor" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_grows_exactly_and_prunes_by_activation(smollm2, tmp_path):
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 7306, 30, 216, 5248]])
    spec = spec_of(smollm2)
    grown = {**spec.shape.to_dict(), "num_layers": 32, "num_heads": 12, "num_kv_heads": 4, "hidden_size": 624,
             "intermediate_size": 1600}
    out = tmp_path / "grown"
    materialize(out, large=smollm2, shape=grown, init="single", dtype="float32")
    torch.testing.assert_close(logits(out, ids), logits(smollm2, ids), atol=1e-4, rtol=0)
    pruned = tmp_path / "pruned"
    result = materialize(pruned, large=smollm2, size="100M", dtype="bfloat16",
                         calibration=Path(__file__).resolve().parents[2] / "shared/data/instruction/"
                                                                           "minillm_dolly_dev.jsonl")
    assert result.provenance["importance"]["kind"] == "activation"
    assert abs(result.params - 100e6) <= 3e6 and result.shape.num_layers == 30
    model = AutoModelForCausalLM.from_pretrained(pruned)
    assert model.num_parameters() == result.params


def test_cli_heals_the_materialized_model_from_the_larger_anchor(tiny_model, tmp_path, capsys):
    small, large = _two_anchors(tiny_model, tmp_path)
    out = tmp_path / "healed"
    shape = json.dumps({**spec_of(large).shape.to_dict(), "num_layers": 3})
    assert cbd(["materialize", "--small", str(small), "--large", str(large), "--shape", shape, "--dtype", "float32",
                "--heal-steps", "2", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["heal"]["steps"] == 2 and summary["heal"]["validation_loss_before"] > 0
    record = json.loads((out / "cbd.json").read_text())
    assert record["distillation"]["role"] == "heal" and record["distillation"]["teacher"] == str(large)
    assert record["alpha_search"]["knots"]  # the materializer's record travels with the healed model
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".healed")) == []  # no scratch left
    assert cbd(["materialize", "--small", str(small), "--shape", shape, "--heal-steps", "2",
                "--out", str(tmp_path / "x")]) == 2  # healing needs the larger anchor as its teacher


def test_heal_settings_are_the_chains_with_checkpoints_every_fifth_and_minillm_between_rollouts():
    from cbd_engine.pipelines.heal import heal_config
    from cbd_engine.spec.distill_config import DistillConfig

    config = heal_config(DistillConfig(learning_rate=1e-4, batch_size=4), 100)
    assert (config.steps, config.learning_rate, config.batch_size, config.checkpoint_every) == (100, 1e-4, 4, 20)
    assert heal_config(DistillConfig(), 30, learning_rate=5e-5).learning_rate == 5e-5
    assert heal_config(DistillConfig(), 8).checkpoint_every == 0  # shorter than one checkpoint interval
    minillm = heal_config(DistillConfig(mode="minillm", ppo_epochs=4), 30)
    assert minillm.checkpoint_every == 12 and minillm.loss == "reverse_kl"
    with pytest.raises(ValueError, match="at least 1"):
        heal_config(DistillConfig(), 0)


def test_magnitude_importance_sums_each_unit_s_squared_weights_and_biases(tiny_model):
    """GPT-2: an FFN neuron is a column of c_fc (Conv1D: [in, out]), its bias, and a row of c_proj."""
    from cbd_engine.materialization.importance import magnitude_importance

    folder = tiny_model("gpt2")
    state = load_file(folder / "model.safetensors")
    spec = spec_of(folder)
    importance = magnitude_importance(folder, spec)
    for layer in range(spec.shape.num_layers):
        prefix = f"transformer.h.{layer}.mlp." if f"transformer.h.{layer}.mlp.c_fc.bias" in state else f"h.{layer}.mlp."
        expected = (state[prefix + "c_fc.weight"].pow(2).sum(0) + state[prefix + "c_fc.bias"].pow(2)
                    + state[prefix + "c_proj.weight"].pow(2).sum(1))
        torch.testing.assert_close(torch.tensor(importance.ffn[layer]), expected, rtol=1e-5, atol=1e-6)
