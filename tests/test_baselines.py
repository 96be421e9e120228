"""The baselines (linear, cat, svd, ties, dare_*, magnitude_prune) against PEFT's ``add_weighted_adapter``.

Inputs PEFT accepts: equal ranks (r = 8) with ``lora_alpha != r``, loaded into one PeftModel on the tiny Llama.
Updates are compared module by module (``scale * B @ A``). Where PEFT's result differs, the test writes out
both formulas and asserts ours, the exact one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_mixed_adapters, make_peft_adapter, tiny_llama
from helpers import dense_updates, summed_updates

import loralego
from loralego import taskmath
from loralego.densesvd import truncate_dense
from loralego.options import make_options
from loralego.pipeline import merge_module, module_seed, plan_merge

WEIGHTS = [0.6, 1.3, 0.9]


@pytest.fixture(scope="module")
def mixed_adapters(tmp_path_factory) -> list[Path]:
    """conftest's mixed_adapters (ranks 4, 8, 16, alpha != r, rsLoRA, one on more modules), built once here."""
    return make_mixed_adapters(tmp_path_factory.mktemp("mixed"))


@pytest.fixture(scope="module")
def equal_paths(tmp_path_factory) -> list[Path]:
    """Three r = 8 adapters, all lora_alpha = 16 (scale 2): the inputs every PEFT merge accepts."""
    root = tmp_path_factory.mktemp("equal")
    return [make_peft_adapter(root / f"e{i}", r=8, alpha=16, seed=20 + i) for i in range(3)]


@pytest.fixture(scope="module")
def scaled_paths(tmp_path_factory) -> list[Path]:
    """Three r = 8 adapters of different scales (alpha 16, 4, 40)."""
    root = tmp_path_factory.mktemp("scaled")
    return [make_peft_adapter(root / f"s{i}", r=8, alpha=a, seed=30 + i) for i, a in enumerate((16, 4, 40))]


def _peft_model(paths: list[Path]):
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(), str(paths[0]), adapter_name="in0")
    for i, path in enumerate(paths[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"in{i}")
    return model


@pytest.fixture(scope="module")
def peft_equal(equal_paths):
    return _peft_model(equal_paths)


@pytest.fixture(scope="module")
def peft_scaled(scaled_paths):
    return _peft_model(scaled_paths)


def peft_merge(model, name: str, weights: list[float], **kwargs) -> dict[str, torch.Tensor]:
    """Run PEFT's add_weighted_adapter and return ``{module: scale * B @ A}`` of the new adapter, float64."""
    from peft.tuners.lora import LoraLayer

    inputs = [n for n in model.peft_config if n.startswith("in")]
    model.add_weighted_adapter(inputs, weights, name, **kwargs)
    updates = {}
    for key, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and name in layer.lora_A:
            lora_a = layer.lora_A[name].weight.detach().double()
            lora_b = layer.lora_B[name].weight.detach().double()
            updates[key.removeprefix("base_model.model.")] = layer.scaling[name] * lora_b @ lora_a
    return updates


def ours(paths: list[Path], weights: list[float], **options) -> dict[str, torch.Tensor]:
    return dense_updates(loralego.merge([loralego.load(p) for p in paths], weights=weights, **options))


def assert_same_updates(actual: dict, expected: dict, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    assert sorted(actual) == sorted(expected)
    for module in expected:
        torch.testing.assert_close(actual[module], expected[module], rtol=rtol, atol=atol, msg=module)


# --- linear, cat, svd -----------------------------------------------------------------------------------


@pytest.mark.parametrize("inputs", ["equal", "scaled"])
def test_linear_equals_peft_linear(inputs, equal_paths, scaled_paths, peft_equal, peft_scaled):
    """Both put ``sqrt(|w_j| s_j)`` on each factor (sign of w on A), so the updates, cross terms included,
    are the same: ``(sum_j c_j B_j)(sum_j sgn(w_j) c_j A_j)`` with ``c_j = sqrt(|w_j| s_j)``. This holds for
    inputs that share alpha / r and, with peft 0.21 (weight and scale both under the square root), for
    inputs of different scales too."""
    paths, model = (equal_paths, peft_equal) if inputs == "equal" else (scaled_paths, peft_scaled)
    weights = [0.6, -1.3, 0.9]
    expected = peft_merge(model, f"linear_{inputs}", weights, combination_type="linear")
    assert_same_updates(ours(paths, weights, method="linear"), expected)


def test_cat_equals_peft_cat_and_the_exact_sum(equal_paths, peft_equal):
    expected = peft_merge(peft_equal, "cat", WEIGHTS, combination_type="cat")
    actual = ours(equal_paths, WEIGHTS, method="cat")
    assert_same_updates(actual, expected)
    assert_same_updates(actual, summed_updates([loralego.load(p) for p in equal_paths], WEIGHTS))


@pytest.mark.parametrize("k", [3, 8])
def test_svd_equals_peft_svd(k, equal_paths, peft_equal):
    """PEFT takes a full SVD of the dense sum and puts S on B; we take the SVD of the thin factors and split
    sqrt(S) on each side. The factors differ, the rank-k updates agree."""
    expected = peft_merge(peft_equal, f"svd{k}", WEIGHTS, combination_type="svd", svd_rank=k)
    assert_same_updates(ours(equal_paths, WEIGHTS, method="svd", rank=k), expected)


# --- ties, magnitude_prune: factor space (PEFT's plain variants) and dense space (PEFT's *_svd) ------------


@pytest.mark.parametrize("majority_sign", ["total", "frequency"])
def test_ties_factor_space_equals_peft_ties(majority_sign, equal_paths, peft_equal):
    weights = [0.8, 0.8, 0.8]  # one weight x scale for all inputs: PEFT's election then equals ours (see below)
    expected = peft_merge(
        peft_equal,
        f"ties_{majority_sign}",
        weights,
        combination_type="ties",
        density=0.5,
        majority_sign_method=majority_sign,
    )
    actual = ours(equal_paths, weights, method="ties", space="factors", density=0.5, majority_sign=majority_sign)
    assert_same_updates(actual, expected)


def test_ties_dense_space_equals_peft_ties_svd(equal_paths, peft_equal):
    expected = peft_merge(peft_equal, "ties_svd", [1.0] * 3, combination_type="ties_svd", density=0.3, svd_rank=6)
    assert_same_updates(ours(equal_paths, [1.0] * 3, method="ties", density=0.3, rank=6), expected)


def test_magnitude_prune_equals_peft_in_both_spaces(equal_paths, peft_equal):
    """No sign election: pruning ignores a positive factor, so any weights agree with PEFT."""
    expected = peft_merge(peft_equal, "mp", WEIGHTS, combination_type="magnitude_prune", density=0.4)
    assert_same_updates(ours(equal_paths, WEIGHTS, method="magnitude_prune", space="factors", density=0.4), expected)
    expected = peft_merge(
        peft_equal, "mp_svd", WEIGHTS, combination_type="magnitude_prune_svd", density=0.4, svd_rank=8
    )
    assert_same_updates(ours(equal_paths, WEIGHTS, method="magnitude_prune", density=0.4), expected)


def _trim(t: torch.Tensor, density: float) -> torch.Tensor:
    keep = torch.zeros(t.numel(), dtype=torch.bool)
    keep[t.abs().reshape(-1).topk(int(density * t.numel())).indices] = True
    return t * keep.reshape(t.shape)


def test_ties_with_different_weights_elects_on_the_weighted_updates():
    """Where PEFT differs: with task tensors t_j, weights w_j and trimmed tau_j = trim(t_j),

    ours (TIES on the weighted task vectors x_j = w_j tau_j):
        s = sgn(sum_j x_j),             merged = sum_j x_j [sgn x_j = s] / #{j : sgn x_j = s}
    PEFT (elects on the unweighted tau_j, weights afterwards):
        s' = sgn(sum_j tau_j),          merged' = sum_j w_j tau_j [sgn tau_j = s'] / #{j : sgn tau_j = s'}

    They agree when all w_j are one positive number. With a negative weight PEFT lets a negated task vote with
    its un-negated values and then adds the entries that disagree with the elected sign of the sum; ours merges
    exactly the contributions it elected on, so it is the one we assert."""
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(12, 10, generator=generator) for _ in range(3)]
    weights = [1.0, -1.0, 0.3]
    density = 0.5
    from peft.utils import merge_utils

    def disjoint(values: list[torch.Tensor], voters: list[torch.Tensor]) -> torch.Tensor:
        sign = torch.where(sum(voters) >= 0, 1.0, -1.0)
        agree = [v.sign() == sign for v in voters]
        return sum(x * a for x, a in zip(values, agree, strict=True)) / torch.stack(agree).sum(0).clamp_min(1)

    trimmed = [_trim(t, density) for t in tensors]
    weighted = [w * t for w, t in zip(weights, trimmed, strict=True)]
    exact = disjoint(weighted, weighted)
    peft_formula = disjoint(weighted, trimmed)

    weighted_inputs = [w * t for w, t in zip(weights, tensors, strict=True)]
    torch.testing.assert_close(taskmath.ties(weighted_inputs, density), exact)
    torch.testing.assert_close(merge_utils.ties(tensors, torch.tensor(weights), density), peft_formula)
    assert not torch.allclose(exact, peft_formula)
    same = [0.7] * 3  # one positive weight: both formulas are the same
    torch.testing.assert_close(
        taskmath.ties([0.7 * t for t in tensors], density), merge_utils.ties(tensors, torch.tensor(same), density)
    )


# --- DARE: same seed, same masks -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties_total", "dare_ties_frequency"])
def test_dare_pure_functions_equal_peft_with_the_same_seed(kind):
    """``torch.manual_seed(s)`` before PEFT's function and our generator seeded s draw the same masks."""
    from peft.utils import merge_utils

    generator = torch.Generator().manual_seed(1)
    tensors = [torch.randn(16, 24, generator=generator) for _ in range(4)]
    density, seed = 0.3, 1234
    torch.manual_seed(seed)
    ours_generator = torch.Generator().manual_seed(seed)
    if kind == "dare_linear":
        expected = merge_utils.dare_linear(tensors, torch.ones(4), density)
        actual = taskmath.dare_linear(tensors, density, ours_generator)
    else:
        sign = kind.removeprefix("dare_ties_")
        expected = merge_utils.dare_ties(tensors, torch.ones(4), density, sign)
        actual = taskmath.dare_ties(tensors, density, ours_generator, sign)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def _module_job_inputs(paths: list[Path], module: str, weights: list[float]):
    adapters = [loralego.load(p) for p in paths]
    raw = [a.factors(module) for a in adapters]
    scales = [a.scale(module) for a in adapters]
    return adapters, raw, scales


@pytest.mark.parametrize("space", ["factors", "dense"])
def test_dare_linear_module_equals_peft_formula_with_the_module_seed(space, equal_paths):
    """PEFT's add_weighted_adapter draws DARE masks from the global RNG, for all modules in model order and
    after initialising the new adapter's weights, so no seed makes its whole-model stream ours: we seed every
    module on its own (``module_seed(seed, name)``) so a module's result does not depend on the others.
    Module by module, PEFT's own code run after ``torch.manual_seed(module seed)`` gives our result."""
    from peft.utils import merge_utils

    module = "model.layers.1.self_attn.v_proj"
    adapters, raw, scales = _module_job_inputs(equal_paths, module, WEIGHTS)
    plan = plan_merge(adapters, make_options(method="dare_linear", density=0.4, space=space, seed=7, weights=WEIGHTS))
    result = merge_module(plan, module)
    torch.manual_seed(module_seed(7, module))
    if space == "factors":  # PEFT's dare_linear: A factors then B factors, each weighted by sqrt(w s)
        factor_weights = torch.tensor([(w * s) ** 0.5 for w, s in zip(WEIGHTS, scales, strict=True)])
        peft_a = merge_utils.dare_linear([a for a, _ in raw], factor_weights, 0.4)
        peft_b = merge_utils.dare_linear([b for _, b in raw], factor_weights, 0.4)
        expected = peft_b.double() @ peft_a.double()
    else:  # PEFT's dare_linear_svd: the scaled dense updates, weighted, then a rank-8 SVD
        deltas = [s * b @ a for (a, b), s in zip(raw, scales, strict=True)]
        dense = merge_utils.dare_linear(deltas, torch.tensor(WEIGHTS), 0.4).double()
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        expected = u[:, :8] @ torch.diag(s[:8]) @ vh[:8]
    actual = result.lora_b.double() @ result.lora_a.double()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_dare_same_seed_same_bytes_other_seed_other_result(equal_paths, tmp_path):
    adapters = [loralego.load(p) for p in equal_paths]
    outs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        loralego.merge_to_folder(adapters, tmp_path / name, method="dare_ties", seed=seed, density=0.5)
        outs.append((tmp_path / name / "adapter_model.safetensors").read_bytes())
    assert outs[0] == outs[1]
    first, other = (dense_updates(loralego.load(tmp_path / n)) for n in ("a", "c"))
    assert not torch.allclose(first["model.layers.0.self_attn.q_proj"], other["model.layers.0.self_attn.q_proj"])


# --- mixed ranks, consistency --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_dense_space_merges_mixed_ranks_and_factor_space_refuses_them(method, mixed_adapters):
    adapters = [loralego.load(p) for p in mixed_adapters]
    merged = loralego.merge(adapters, method=method, rank=5)
    assert {info.rank for info in merged.modules.values()} == {5}
    assert all(torch.isfinite(u).all() for u in dense_updates(merged).values())
    with pytest.raises(loralego.LoraLegoError, match=r"--space factors needs equal ranks, got \[4, 8, 16\]"):
        loralego.merge(adapters, method=method, space="factors")


def test_factor_space_refuses_another_rank(equal_paths):
    adapters = [loralego.load(p) for p in equal_paths]
    with pytest.raises(loralego.LoraLegoError, match="keeps the input rank 8, but rank 4 was asked"):
        loralego.merge(adapters, method="ties", space="factors", rank=4)


@pytest.mark.parametrize("method", ["magnitude_prune", "dare_linear"])
def test_density_one_reduces_to_svd(method, mixed_adapters):
    """Nothing pruned: the sum of the full updates, truncated exactly, is what svd computes from factors."""
    adapters = [loralego.load(p) for p in mixed_adapters]
    weights = [0.5, 2.0, -1.0]
    assert_same_updates(
        dense_updates(loralego.merge(adapters, method=method, density=1.0, rank=6, weights=weights)),
        dense_updates(loralego.merge(adapters, method="svd", rank=6, weights=weights)),
    )


def test_taskmath_small_cases():
    t = torch.tensor([[3.0, -1.0], [0.5, -4.0]])
    assert torch.equal(taskmath.trim_by_magnitude(t, 0.5), torch.tensor([[3.0, 0.0], [0.0, -4.0]]))
    stacked = torch.tensor([[2.0, -1.0, 0.0], [-1.0, -1.0, 0.0], [-0.5, 3.0, 0.0]])
    assert torch.equal(taskmath.elect_sign(stacked, "total"), torch.tensor([1.0, 1.0, 1.0]))
    assert torch.equal(taskmath.elect_sign(stacked, "frequency"), torch.tensor([-1.0, -1.0, 1.0]))
    merged = taskmath.disjoint_merge(stacked, torch.tensor([1.0, -1.0, 1.0]))
    assert torch.equal(merged, torch.tensor([2.0, -1.0, 0.0]))


@pytest.mark.parametrize("shape", [(30, 70), (70, 30)])
def test_truncate_dense_is_the_best_rank_k_approximation(shape):
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    lora_a, lora_b = truncate_dense(matrix, 5)
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    torch.testing.assert_close(lora_b.double() @ lora_a.double(), u[:, :5] * s[:5] @ vh[:5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora_a.norm(dim=1), lora_b.norm(dim=0))  # balanced: sqrt(S) on each side
