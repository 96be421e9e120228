"""The core space engine and the methods computed in it (tsv, iso_c, iso_cts, knots_*, --space core), each
against a direct dense implementation of the published formula written out here on small random matrices."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama
from helpers import dense_updates, summed_updates

import loralego
from loralego import taskmath
from loralego.corespace import core_space, to_update, truncate_core
from loralego.methods import ModuleJob, get_method
from loralego.methods.knots import knots_basis
from loralego.methods.spectral import iso_c_components, tsv_components
from loralego.options import make_options

D_OUT, D_IN = 24, 20


def _factors(ranks: list[int], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(r, D_IN, generator=generator, dtype=torch.float64),
         torch.randn(D_OUT, r, generator=generator, dtype=torch.float64) * 0.5)
        for r in ranks
    ]


def _job(factors, rank: int, method: str, **params) -> ModuleJob:
    return ModuleJob(
        module="m",
        factors=[(a.float(), b.float()) for a, b in factors],
        adapter_indices=list(range(len(factors))),
        source_ranks=[a.shape[0] for a, _ in factors],
        rank=rank,
        rank_requested=True,
        seed=7,
        params=get_method(method).params(**params),
    )


def _merged_update(method: str, factors, rank: int, **options) -> torch.Tensor:
    result = get_method(method).merge(_job(factors, rank, method, **options))
    return result.lora_b.double() @ result.lora_a.double()


def _best_rank(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


def _polar(matrix: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


# --- the engine -------------------------------------------------------------------------------------------


def test_core_projection_is_lossless_for_the_mixed_inputs_as_loaded(mixed_adapters):
    """Ranks 4, 8, 16, alpha != r, rsLoRA, one adapter on more modules: folded factors as the pipeline reads
    them; each input reprojected from its core equals its update to 1e-6 relative."""
    adapters = [loralego.load(p) for p in mixed_adapters]
    for module in sorted({m for a in adapters for m in a.modules}):
        holders = [a for a in adapters if module in a.modules]
        space = core_space([a.folded(module) for a in holders])
        for adapter, core in zip(holders, space.cores, strict=True):
            expected = dense_updates(adapter)[module]
            error = torch.linalg.norm(to_update(space, core) - expected) / torch.linalg.norm(expected)
            assert float(error) < 1e-6, (module, adapter.name)
        pool = sum(a.modules[module].rank for a in holders)
        d_out, d_in = holders[0].modules[module].d_out, holders[0].modules[module].d_in
        assert space.cores[0].shape == (min(pool, d_out), min(pool, d_in))


def test_truncate_core_is_the_best_rank_k_of_the_mapped_back_core():
    factors = _factors([3, 5])
    space = core_space(factors)
    merged = space.cores[0] - 2 * space.cores[1]
    cut = truncate_core(space, merged, 4)
    dense = to_update(space, merged)
    torch.testing.assert_close(cut.lora_b.double() @ cut.lora_a.double(), _best_rank(dense, 4), rtol=1e-5, atol=1e-5)
    s = torch.linalg.svdvals(dense)
    assert cut.kept_energy == pytest.approx(float((s[:4] ** 2).sum() / (s**2).sum()), rel=1e-9)


# --- TSV ---------------------------------------------------------------------------------------------------


def _tsv_dense(updates: list[torch.Tensor], budgets: list[int]) -> torch.Tensor:
    """TSV-Merge as published, on dense updates: each task's top triplets, polar factors of the concatenated U
    and V, rebuilt with the concatenated S. The published budget is min(d)/T per task; for a rank-r update all
    but r of those have s = 0 and arbitrary vectors (which would change the polar factors), so the budget is
    the task's rank: every non-null component."""
    us, ss, vs = [], [], []
    for update, budget in zip(updates, budgets, strict=True):
        u, s, vh = torch.linalg.svd(update, full_matrices=False)
        us.append(u[:, :budget])
        ss.append(s[:budget])
        vs.append(vh[:budget])
    return _polar(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ _polar(torch.cat(vs, 0).T).T


def test_tsv_equals_the_dense_formula_and_its_u_v_are_orthonormal():
    factors = _factors([3, 4], seed=1)  # 3 + 4 <= min(d) / 2: every component of each task is kept
    space = core_space(factors)
    u, s, v = tsv_components(space, [3, 4])
    eye = torch.eye(7, dtype=torch.float64)
    full_u, full_v = space.basis_out @ u, space.basis_in @ v
    torch.testing.assert_close(full_u.T @ full_u, eye, rtol=0, atol=1e-10)
    torch.testing.assert_close(full_v.T @ full_v, eye, rtol=0, atol=1e-10)
    expected = _tsv_dense([b @ a for a, b in factors], [3, 4])
    torch.testing.assert_close(full_u @ torch.diag(s) @ full_v.T, expected, rtol=1e-8, atol=1e-8)
    # The method: alpha times that, cut to its best rank k.
    merged = _merged_update("tsv", factors, 5, tsv_alpha=0.7)
    torch.testing.assert_close(merged, _best_rank(0.7 * expected, 5), rtol=1e-4, atol=1e-5)


# --- Iso-C, Iso-CTS ------------------------------------------------------------------------------------------


def test_iso_c_equals_the_dense_formula_with_a_flat_spectrum_at_alpha_times_the_mean():
    factors = _factors([3, 5], seed=2)
    total = sum(b @ a for a, b in factors)
    s = torch.linalg.svdvals(total)[:8]  # the sum's spectrum (its rank is at most N = 8)
    u, _, vh = torch.linalg.svd(total)
    alpha, rank = 1.3, 5
    expected = alpha * float(s.mean()) * u[:, :rank] @ vh[:rank]  # flattened to the mean of the N values, top k
    merged = _merged_update("iso_c", factors, rank, iso_alpha=alpha)
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)
    singular = torch.linalg.svdvals(merged)
    torch.testing.assert_close(singular[:rank], torch.full((rank,), alpha * float(s.mean()), dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    assert float(singular[rank:].max()) < 1e-5
    # At full core rank the spectrum is flat over all N directions.
    space = core_space(factors)
    _, flat, _, _ = iso_c_components(space)
    assert torch.allclose(flat, flat[0].expand_as(flat))


def _iso_cts_dense(updates: list[torch.Tensor], size: int, fraction: float) -> torch.Tensor:
    """Iso-CTS as published (danielm1405/iso-merging), with the spectrum size N instead of min(d)."""
    tasks = len(updates)
    common = int(size * fraction)
    per_task = round((size - common) / tasks)
    common = size - per_task * tasks
    u, s, vh = torch.linalg.svd(sum(updates), full_matrices=False)
    uc, sc, vc = u[:, :common], s[:common], vh[:common]
    us, ss, vs = [], [], []
    for update in updates:
        u_j, s_j, vh_j = torch.linalg.svd(update - uc @ uc.T @ update, full_matrices=False)
        us.append(u_j[:, :per_task])
        ss.append(s_j[:per_task])
        vs.append(vh_j[:per_task])
    u_all = _polar(torch.cat([*us, uc], 1))
    v_all = _polar(torch.cat([*vs, vc], 0).T)
    s_all = torch.cat([*ss, sc])
    return u_all, s_all, v_all


def test_iso_cts_equals_the_dense_formula():
    factors = _factors([4, 4], seed=3)
    updates = [b @ a for a, b in factors]
    u, s, v = _iso_cts_dense(updates, 8, 0.5)  # common 4, task-specific 2 each
    full = float(s.mean()) * u @ v.T
    # At rank N the result is the full iso-CTS matrix (no truncation choice involved).
    merged = _merged_update("iso_cts", factors, 8, iso_common_fraction=0.5)
    torch.testing.assert_close(merged, full, rtol=1e-4, atol=1e-5)
    # At rank k: the k components of largest singular value before flattening, at the flat value.
    order = torch.argsort(s, descending=True)[:5]
    expected = float(s.mean()) * u[:, order] @ v[:, order].T
    torch.testing.assert_close(_merged_update("iso_cts", factors, 5, iso_common_fraction=0.5), expected,
                               rtol=1e-4, atol=1e-5)


# --- KnOTS ----------------------------------------------------------------------------------------------------


def test_knots_basis_reproduces_each_input_and_knots_ties_equals_the_dense_formula():
    factors = _factors([3, 5], seed=4)
    updates = [b @ a for a, b in factors]
    basis, reps = knots_basis(core_space(factors))
    torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1], dtype=torch.float64), rtol=0, atol=1e-10)
    for rep, update in zip(reps, updates, strict=True):
        torch.testing.assert_close(basis @ rep, update, rtol=1e-9, atol=1e-9)
    # Dense KnOTS: SVD of [dW_1 dW_2], reps diag(S) V_j, TIES (trim, elect by sum, disjoint mean), U @ merged.
    u, s, vh = torch.linalg.svd(torch.cat(updates, dim=1), full_matrices=False)
    keep = s > 1e-9 * s.max()
    u, s, vh = u[:, keep], s[keep], vh[keep]
    dense_reps = [torch.diag(s) @ vh[:, j * D_IN:(j + 1) * D_IN] for j in range(2)]
    for density in (1.0, 0.3):
        expected = 0.5 * u @ taskmath.ties(dense_reps, density, "total")
        merged = _merged_update("knots_ties", factors, 8, knots_ties_density=density)
        torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)


def test_knots_dare_is_seeded_and_equals_dense_ties_at_density_one():
    factors = _factors([4, 4], seed=5)
    one = _merged_update("knots_dare", factors, 8, knots_dare_density=1.0, knots_dare_alpha=0.5)
    torch.testing.assert_close(one, _merged_update("knots_ties", factors, 8), rtol=1e-5, atol=1e-6)
    first = _merged_update("knots_dare", factors, 8)
    torch.testing.assert_close(first, _merged_update("knots_dare", factors, 8), rtol=0, atol=0)


# --- core-space TIES / DARE ------------------------------------------------------------------------------------


def test_core_ties_on_inputs_diagonal_in_the_core_equals_dense_ties():
    """Updates ``P D_j Q^T`` with P, Q coordinate vectors and diagonal D_j: the cores are the diagonals, so TIES
    in the core equals dense TIES on the updates when both keep the same number of entries."""
    generator = torch.Generator().manual_seed(6)
    r, coords_out, coords_in = 4, torch.tensor([5, 1, 17, 9]), torch.tensor([3, 11, 0, 14])
    p = torch.eye(D_OUT, dtype=torch.float64)[:, coords_out]
    q = torch.eye(D_IN, dtype=torch.float64)[:, coords_in]
    diagonals = [torch.randn(r, generator=generator, dtype=torch.float64) * (1 + j) for j in range(3)]
    factors = [(q.T.clone(), p * d[None, :]) for d in diagonals]  # A = Q^T, B = P D: update P D Q^T
    updates = [b @ a for a, b in factors]
    space = core_space(factors)
    for core in space.cores:  # diagonal in the core: r nonzero entries, one per row and column
        assert int((core.abs() > 1e-12).sum()) == r
    kept = 3  # entries kept per task in both spaces
    n = space.cores[0].numel()
    core_density, dense_density = (kept + 0.5) / n, (kept + 0.5) / (D_OUT * D_IN)
    expected = taskmath.ties(updates, dense_density)
    torch.testing.assert_close(to_update(space, taskmath.ties(space.cores, core_density)), expected,
                               rtol=1e-9, atol=1e-12)
    merged = _merged_update("ties", factors, 4, space="core", density=core_density)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_core_space_methods_equal_their_formula_on_the_cores(method):
    factors = _factors([3, 5], seed=8)
    space = core_space(factors)
    job = _job(factors, 6, method, space="core", density=0.4)
    generator = job.generator()
    combine = {
        "ties": lambda t: taskmath.ties(t, 0.4),
        "dare_linear": lambda t: taskmath.dare_linear(t, 0.4, generator),
        "dare_ties": lambda t: taskmath.dare_ties(t, 0.4, generator),
        "magnitude_prune": lambda t: taskmath.magnitude_prune(t, 0.4),
    }[method]
    expected = _best_rank(to_update(space, combine(space.cores)), 6)
    result = get_method(method).merge(job)
    torch.testing.assert_close(result.lora_b.double() @ result.lora_a.double(), expected, rtol=1e-4, atol=1e-5)
    assert 0 < result.details["kept_energy"] <= 1


def test_core_ties_does_not_depend_on_the_order_of_the_inputs():
    factors = _factors([3, 5, 4], seed=9)
    forward = _merged_update("ties", factors, 6, space="core", density=0.3)
    backward = _merged_update("ties", factors[::-1], 6, space="core", density=0.3)
    torch.testing.assert_close(forward, backward, rtol=1e-4, atol=1e-5)


# --- through the pipeline: mixed ranks, partial modules, PEFT forward -----------------------------------------


METHODS = [("tsv", {}), ("iso_c", {}), ("iso_cts", {}), ("knots_ties", {}), ("knots_dare", {}),
           ("ties", {"space": "core"}), ("dare_ties", {"space": "core"})]


@pytest.mark.parametrize(("method", "extra"), METHODS)
def test_new_methods_load_in_peft_with_the_expected_forward(method, extra, mixed_adapters, tmp_path):
    from peft import PeftModel

    adapters = [loralego.load(p) for p in mixed_adapters]
    out = tmp_path / "merged"
    loralego.merge_to_folder(adapters, out, method=method, rank=6, seed=1, **extra)
    merged = loralego.load(out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 6
    assert {m: info.rank for m, info in merged.modules.items()} == {m: 6 for m in merged.modules}
    # k_proj / o_proj are held by one input only: merged from it alone.
    assert any("k_proj" in m for m in merged.modules)
    ids = torch.arange(12).reshape(2, 6)
    model = tiny_llama()
    with torch.no_grad():
        for module, update in dense_updates(merged).items():
            model.get_submodule(module).weight += update.float()
        expected = model(ids).logits
        logits = PeftModel.from_pretrained(tiny_llama(), str(out)).eval()(ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert (logits - tiny_llama()(ids).logits).abs().max() > 1e-4


def test_iso_c_on_one_input_module_is_its_flattened_update(mixed_adapters):
    adapters = [loralego.load(p) for p in mixed_adapters]
    merged = loralego.merge(adapters, method="iso_c", rank=8)
    module = "model.layers.0.self_attn.k_proj"  # held by the rank-8 input only
    update = summed_updates(adapters)[module]
    u, s, vh = torch.linalg.svd(update)
    expected = float(s[:8].mean()) * u[:, :8] @ vh[:8]
    torch.testing.assert_close(dense_updates(merged)[module], expected, rtol=1e-4, atol=1e-5)


def test_bad_scale_is_one_line_error():
    with pytest.raises(loralego.LoraLegoError, match="iso_common_fraction"):
        make_options(method="iso_cts", iso_common_fraction=1.5)
    with pytest.raises(loralego.LoraLegoError, match="tsv_alpha"):
        make_options(method="tsv", tsv_alpha=float("nan"))
