"""Heterogeneous-rank LoRA server rules (maestro_fl/adapter_merges.py) against their formulas, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from maestro_fl.adapter_merges import (
    adapter_product,
    flexlora_merge,
    flora_stack,
    fslora_merge,
    hetlora_weights,
    rank_partitioned_merge,
    sketch_indices,
    sketched_product,
    truncated_factors,
    zero_pad_merge,
)


def adapters(ranks: list[int], seed: int = 0, d_out: int = 6, d_in: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(d_out, r)), rng.normal(size=(r, d_in))) for r in ranks]


def test_hetlora_weighs_each_client_by_the_norm_of_its_product() -> None:
    one = (np.array([[1.0], [0.0]]), np.array([[2.0, 0.0]]))  # B A = [[2, 0], [0, 0]]: norm 2
    two = (np.array([[3.0, 0.0], [0.0, 3.0]]), np.array([[2.0, 0.0], [0.0, 0.0]]))  # [[6, 0], [0, 0]]: norm 6
    np.testing.assert_allclose(hetlora_weights([one, two]), [0.25, 0.75])


def test_zero_padding_averages_the_padded_factors() -> None:
    one = (np.array([[1.0], [0.0]]), np.array([[2.0, 0.0]]))
    two = (np.array([[3.0, 1.0], [0.0, 3.0]]), np.array([[2.0, 0.0], [0.0, 4.0]]))
    b, a = zero_pad_merge([one, two], [1.0, 3.0])
    np.testing.assert_allclose(b, [[0.25 * 1 + 0.75 * 3, 0.75 * 1], [0.0, 0.75 * 3]])
    np.testing.assert_allclose(a, [[0.25 * 2 + 0.75 * 2, 0.0], [0.0, 0.75 * 4]])


def test_flora_stacking_gives_exactly_the_weighted_sum_of_products() -> None:
    clients = adapters([1, 3, 2])
    p, s = [10.0, 30.0, 60.0], [4.0, 4 / 3, 2.0]  # alpha / r with alpha = 4
    b, a = flora_stack(clients, p, s)
    assert b.shape == (6, 6) and a.shape == (6, 5)  # global rank 1 + 3 + 2
    expected = sum(pk / 100 * sk * bk @ ak for pk, sk, (bk, ak) in zip(p, s, clients))
    np.testing.assert_allclose(b @ a, expected, rtol=1e-12, atol=1e-12)


def test_flexlora_redistributes_the_truncated_svd_of_the_mean_product() -> None:
    clients = adapters([2, 4])
    examples, scalings = [1.0, 3.0], [8 / 2, 8 / 4]
    mean, factors = flexlora_merge(clients, examples, scalings, ranks=[1, 3], out_scalings=[8.0, 8 / 3])
    expected_mean = 0.25 * 4 * clients[0][0] @ clients[0][1] + 0.75 * 2 * clients[1][0] @ clients[1][1]
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-12)
    u, sv, vt = np.linalg.svd(expected_mean)
    for (b, a), r, scale in zip(factors, [1, 3], [8.0, 8 / 3]):
        assert b.shape == (6, r) and a.shape == (r, 5)
        best = (u[:, :r] * sv[:r]) @ vt[:r]
        np.testing.assert_allclose(scale * b @ a, best, atol=1e-10)
        # Eckart-Young: the error is the trailing singular values
        assert np.linalg.norm(expected_mean - scale * b @ a) == pytest.approx(np.sqrt((sv[r:] ** 2).sum()))


def test_truncation_never_exceeds_the_matrix_rank() -> None:
    b, a = truncated_factors(np.eye(3), 10)
    assert b.shape == (3, 3) and np.allclose(b @ a, np.eye(3))


def test_the_fslora_sketch_is_unbiased_over_many_draws() -> None:
    (b, a), = adapters([8], seed=3)
    rng = np.random.default_rng(0)
    for kept in (1, 3, 8):
        draws = [sketched_product(b, a, sketch_indices(8, kept, rng)) for _ in range(20000)]
        mean = np.mean(draws, axis=0)
        full = adapter_product(b, a)
        # each draw's sd per entry is at most ~r/m x the largest rank-one term: 20k draws put the mean within ~3%
        assert np.abs(mean - full).max() < 0.05 * np.abs(full).max() + 0.05, kept
    assert sorted(sketch_indices(8, 8, rng)) == list(range(8))
    with pytest.raises(ValueError, match="a sketch keeps 1..8 of 8"):
        sketch_indices(8, 0, rng)


def test_fslora_scatters_each_clients_sketched_update_into_the_global_adapter() -> None:
    updates = [(np.array([0, 2]), np.ones((2, 2)), 2 * np.ones((2, 3))),
               (np.array([2]), 3 * np.ones((2, 1)), 4 * np.ones((1, 3)))]
    db, da = fslora_merge(3, (2, 3), (3, 3), updates, [1.0, 1.0])
    np.testing.assert_allclose(db, [[0.5, 0.0, 0.5 + 1.5]] * 2)
    np.testing.assert_allclose(da, [[1.0] * 3, [0.0] * 3, [1.0 + 2.0] * 3])


def test_rank_partitioned_weights_average_each_component_over_its_holders() -> None:
    one = (np.array([[1.0], [1.0]]), np.array([[1.0, 1.0]]))
    two = (np.array([[3.0, 5.0], [3.0, 5.0]]), np.array([[3.0, 3.0], [5.0, 5.0]]))
    b, a = rank_partitioned_merge([one, two], [1.0, 3.0])
    np.testing.assert_allclose(b, [[0.25 * 1 + 0.75 * 3, 5.0]] * 2)  # component 1: held by client 2 alone
    np.testing.assert_allclose(a, [[2.5, 2.5], [5.0, 5.0]])
    zb, _ = zero_pad_merge([one, two], [1.0, 3.0])
    assert zb[0, 1] == pytest.approx(0.75 * 5)  # zero-padding shrinks what few clients hold
