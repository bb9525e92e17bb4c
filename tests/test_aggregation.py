"""The server maths on their own: ordered-factor averaging, reply checks, server-side shrinking."""

from __future__ import annotations

import numpy as np
import pytest

from maestro_fl.aggregation import (
    aggregate_indexed,
    aggregate_nested,
    aggregate_ordered_factors,
    aggregate_ordered_products,
    aggregate_svd,
    cross_term_share,
    factor_importance,
    shrink_factors,
    slice_prefix,
)
from maestro_fl.budget import Cost, DeviceCapability
from maestro_fl.methods import Assignment, ClientTask
from maestro_fl.replies import check_reply, read_metrics
from maestro_fl.submodels import ranks_of, rolling

rng = np.random.default_rng(0)


def fedavg(updates: list[tuple[dict[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    """The reference: example-weighted FedAvg of identically shaped updates."""
    total = sum(w for _, w in updates)
    return {n: sum(a[n].astype(np.float64) * (w / total) for a, w in updates) for n in updates[0][0]}


def global_model() -> dict[str, np.ndarray]:
    return {
        "fc.in_network.weight": rng.normal(size=(3, 4)).astype(np.float32),  # Vᵀ: rank 3
        "fc.out_network.weight": rng.normal(size=(2, 3)).astype(np.float32),  # U
        "fc.out_network.bias": rng.normal(size=(2,)).astype(np.float32),
        "conv.in_network.weight": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
        "conv.out_network.weight": rng.normal(size=(5, 4, 1, 1)).astype(np.float32),
        "norm.weight": rng.normal(size=(5,)).astype(np.float32),
    }


def perturbed(arrays: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    return {k: (v + r.normal(size=v.shape)).astype(v.dtype) for k, v in arrays.items()}


def test_slice_prefix_cuts_the_rank_axis_only() -> None:
    g = global_model()
    sub = slice_prefix(g, {"fc": 1, "conv": 2})
    assert sub["fc.in_network.weight"].shape == (1, 4) and sub["fc.out_network.weight"].shape == (2, 1)
    assert sub["conv.in_network.weight"].shape == (2, 1, 3, 3) and sub["conv.out_network.weight"].shape == (5, 2, 1, 1)
    assert sub["fc.out_network.bias"].shape == (2,) and sub["norm.weight"].shape == (5,)
    assert ranks_of(sub) == {"fc": 1, "conv": 2}
    np.testing.assert_array_equal(sub["fc.in_network.weight"], g["fc.in_network.weight"][:1])


def test_all_full_rank_equals_fedavg() -> None:
    g = global_model()
    updates = [(perturbed(g, s), float(n)) for s, n in [(1, 10), (2, 30), (3, 5)]]
    ours = aggregate_ordered_factors(g, updates)
    ref = fedavg(updates)
    for k in g:
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-6, atol=1e-6)


def test_hand_computed_prefix_average_and_untouched_components() -> None:
    g = {"l.in_network.weight": np.zeros((3, 2)), "l.out_network.weight": np.full((2, 3), 9.0), "b": np.zeros(2)}
    a = {"l.in_network.weight": np.ones((1, 2)), "l.out_network.weight": np.ones((2, 1)), "b": np.ones(2)}
    b = {"l.in_network.weight": np.full((2, 2), 2.0), "l.out_network.weight": np.full((2, 2), 2.0), "b": np.full(2, 3.0)}
    out = aggregate_ordered_factors(g, [(a, 1.0), (b, 3.0)])
    # component 0: (1·1 + 3·2) / 4 = 1.75; component 1: only b trained it = 2; component 2: nobody, unchanged
    np.testing.assert_allclose(out["l.in_network.weight"], [[1.75, 1.75], [2.0, 2.0], [0.0, 0.0]])
    np.testing.assert_allclose(out["l.out_network.weight"], [[1.75, 2.0, 9.0], [1.75, 2.0, 9.0]])
    np.testing.assert_allclose(out["b"], [2.5, 2.5])  # dense: plain weighted FedAvg


def test_components_no_client_trained_are_unchanged() -> None:
    g = global_model()
    updates = [(slice_prefix(perturbed(g, s), {"fc": 1, "conv": 2}), 1.0) for s in (4, 5)]
    out = aggregate_ordered_factors(g, updates)
    np.testing.assert_array_equal(out["fc.in_network.weight"][1:], g["fc.in_network.weight"][1:])
    np.testing.assert_array_equal(out["conv.out_network.weight"][:, 2:], g["conv.out_network.weight"][:, 2:])
    assert not np.allclose(out["fc.in_network.weight"][:1], g["fc.in_network.weight"][:1])
    assert out["fc.in_network.weight"].dtype == np.float32


def test_nested_width_slices_average_over_holders() -> None:
    g = {"w": np.zeros((3, 3))}
    out = aggregate_nested(g, [({"w": np.ones((1, 1))}, 1.0), ({"w": np.full((2, 3), 4.0)}, 1.0)])
    np.testing.assert_allclose(out["w"], [[2.5, 4, 4], [4, 4, 4], [0, 0, 0]])


def test_update_that_does_not_fit_is_rejected() -> None:
    g = global_model()
    bad = slice_prefix(g, {"fc": 1})
    bad["fc.out_network.weight"] = np.zeros((3, 1), dtype=np.float32)  # wrong output dimension
    with pytest.raises(ValueError, match="fc.out_network.weight"):
        aggregate_ordered_factors(g, [(bad, 1.0)])
    with pytest.raises(ValueError, match="unknown parameter"):
        aggregate_ordered_factors(g, [({"nope": np.zeros(1)}, 1.0)])


@pytest.mark.parametrize(
    "corrupt,reason",
    [
        (lambda a: a.pop("norm.weight"), "missing"),
        (lambda a: a.update(extra=np.zeros(1)), "unexpected"),
        (lambda a: a.update({"fc.in_network.weight": np.zeros((2, 4))}), "wrong rank"),
        (lambda a: a.update({"fc.in_network.weight": np.zeros((1, 5))}), "wrong shape"),
        (lambda a: a["norm.weight"].__setitem__(0, np.nan), "non-finite"),
        (lambda a: a["norm.weight"].__setitem__(1, np.inf), "non-finite"),
    ],
)
def test_check_reply_names_what_is_wrong(corrupt, reason: str) -> None:
    sent = slice_prefix(global_model(), {"fc": 1, "conv": 2})
    cost = Cost(0.5, {}, 0, 0, 0)
    task = ClientTask(1, 0, DeviceCapability(0, 1, 1, 1, 1, 1), cost, Assignment(0.5), {},
                      {k: v.shape for k, v in sent.items()}, {k: str(v.dtype) for k, v in sent.items()}, 0)
    facts = read_metrics({"num-examples": 3, "train-loss": 0.1, "sample-passes": 9})
    assert check_reply(sent, facts, task, 3) is None
    reply = {k: v.copy() for k, v in sent.items()}
    corrupt(reply)
    assert reason in (check_reply(reply, facts, task, 3) or "")


def test_indexed_merge_averages_rolling_windows_that_wrap_around() -> None:
    """Windows of 2 of 4 rows: A holds rows 3, 0 (wrapped) and sends 1s, B rows 1, 2 and sends 3s, C rows 0, 1, 5s."""
    g = {"w": np.full((4, 2), 9.0, dtype=np.float32)}
    a = ({"w": np.ones((2, 2))}, {"w": (rolling(3, 2, 4), slice(None))}, 1.0)
    b = ({"w": np.full((2, 2), 3.0)}, {"w": (rolling(1, 2, 4), slice(None))}, 1.0)
    c = ({"w": np.full((2, 2), 5.0)}, {"w": (rolling(0, 2, 4), slice(None))}, 1.0)
    out = aggregate_indexed(g, [a, b, c])
    # row 0: A and C -> 3; row 1: B and C -> 4; row 2: B -> 3; row 3: A -> 1
    np.testing.assert_allclose(out["w"][:, 0], [3.0, 4.0, 3.0, 1.0])
    assert out["w"].dtype == np.float32
    only_b = aggregate_indexed(g, [b])  # rows nobody held keep their value
    np.testing.assert_allclose(only_b["w"][:, 1], [9.0, 3.0, 3.0, 9.0])


def test_server_shrinking_drops_low_importance_tails() -> None:
    u = np.diag([3.0, 1.0, 1e-4])
    vt = np.diag([3.0, 1.0, 1e-4])
    imp = factor_importance(u, vt)
    np.testing.assert_allclose(imp, [10.0000000005, 1.00000001, 1e-8], rtol=1e-6)
    arrays = {"l.in_network.weight": vt, "l.out_network.weight": u, "l.out_network.bias": np.zeros(3)}
    out, ranks = shrink_factors(arrays, eps=1e-6)
    assert ranks == {"l": 2}
    assert out["l.in_network.weight"].shape == (2, 3) and out["l.out_network.weight"].shape == (3, 2)


def test_svd_aggregation_averages_the_products() -> None:
    from maestro_fl.aggregation import aggregate_svd

    g = global_model()
    a = slice_prefix(perturbed(g, 7), {"fc": 1, "conv": 2})
    b = perturbed(g, 8)
    out = aggregate_svd(g, [(a, 1.0), (b, 3.0)])

    def dense(arrays: dict[str, np.ndarray], layer: str, out_dim: int) -> np.ndarray:
        vt = arrays[f"{layer}.in_network.weight"]
        return arrays[f"{layer}.out_network.weight"].reshape(out_dim, vt.shape[0]) @ vt.reshape(vt.shape[0], -1)

    for layer, m in (("fc", 2), ("conv", 5)):
        average = (1 * dense(a, layer, m) + 3 * dense(b, layer, m)) / 4
        rank = g[f"{layer}.in_network.weight"].shape[0]
        p, s, qt = np.linalg.svd(average, full_matrices=False)
        expected = (p[:, :rank] * s[:rank]) @ qt[:rank]  # the best rank-`rank` approximation of the average
        np.testing.assert_allclose(dense(out, layer, m), expected, rtol=1e-4, atol=1e-4)
        norms = np.linalg.norm(out[f"{layer}.in_network.weight"].reshape(out[f"{layer}.in_network.weight"].shape[0], -1), axis=1)
        assert np.all(norms[:-1] >= norms[1:] - 1e-6)  # ordered by singular value
    np.testing.assert_allclose(out["norm.weight"], (a["norm.weight"] + 3 * b["norm.weight"]) / 4, rtol=1e-6)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in g.items()}


def test_zero_padding_shrinks_components_few_clients_trained() -> None:
    from maestro_fl.aggregation import aggregate_zero_padded

    g = {"l.in_network.weight": np.zeros((3, 2)), "l.out_network.weight": np.full((2, 3), 9.0), "b": np.zeros(2)}
    a = {"l.in_network.weight": np.ones((1, 2)), "l.out_network.weight": np.ones((2, 1)), "b": np.ones(2)}
    b = {"l.in_network.weight": np.full((2, 2), 2.0), "l.out_network.weight": np.full((2, 2), 2.0), "b": np.full(2, 3.0)}
    out = aggregate_zero_padded(g, [(a, 1.0), (b, 3.0)])
    # component 0: (1·1 + 3·2)/4 = 1.75; component 1: (1·0 + 3·2)/4 = 1.5 (a counts as zero); component 2: 0
    np.testing.assert_allclose(out["l.in_network.weight"], [[1.75, 1.75], [1.5, 1.5], [0.0, 0.0]])
    np.testing.assert_allclose(out["l.out_network.weight"], [[1.75, 1.5, 0.0], [1.75, 1.5, 0.0]])
    np.testing.assert_allclose(out["b"], [2.5, 2.5])
    full = global_model()
    updates = [(perturbed(full, s), float(n)) for s, n in [(1, 10), (2, 30)]]
    for k, v in aggregate_zero_padded(full, updates).items():  # all at full rank: plain FedAvg
        np.testing.assert_allclose(v, fedavg(updates)[k], rtol=1e-6, atol=1e-6)


def naive_indexed_mean(global_arrays, updates):  # type: ignore[no-untyped-def]
    """Element by element, the weighted mean over the updates holding it (the definition, in plain loops)."""
    out = {}
    for name, current in global_arrays.items():
        merged = current.astype(np.float64).copy()
        for pos in np.ndindex(current.shape):
            num = den = 0.0
            for arrays, index, w in updates:
                axes = [np.arange(*i.indices(n)) if isinstance(i, slice) else np.asarray(i)
                        for i, n in zip(index[name], current.shape)]
                where = [np.flatnonzero(a == p) for a, p in zip(axes, pos)]
                if all(len(k) for k in where):
                    num += w * float(arrays[name][tuple(int(k[0]) for k in where)])
                    den += w
            if den:
                merged[pos] = num / den
        out[name] = merged.astype(current.dtype)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_aggregate_indexed_is_the_elementwise_mean_over_holders(seed: int) -> None:
    """Parts of one budget (slices, equal but distinct objects) and wrapping windows (integer arrays), mixed."""
    rng = np.random.default_rng(seed)
    current = {"a": rng.standard_normal((5, 4)).astype(np.float32), "b": rng.standard_normal(6).astype(np.float32)}
    updates = []
    for _ in range(int(rng.integers(1, 8))):
        rows = int(rng.integers(1, 6))
        kind = rng.integers(3)
        a_rows = slice(0, rows) if kind == 0 else rolling(int(rng.integers(5)), rows, 5) if kind == 1 else np.sort(
            rng.choice(5, rows, replace=False))
        b_len = int(rng.integers(1, 7))
        index = {"a": (a_rows, slice(0, 4)), "b": (slice(0, b_len),)}
        shape_a = (len(range(*a_rows.indices(5))) if isinstance(a_rows, slice) else len(a_rows), 4)
        arrays = {"a": rng.standard_normal(shape_a).astype(np.float32), "b": rng.standard_normal(b_len).astype(np.float32)}
        updates.append((arrays, index, float(rng.integers(1, 50))))
    got, want = aggregate_indexed(current, updates), naive_indexed_mean(current, updates)
    for name in current:
        assert got[name].dtype == current[name].dtype
        np.testing.assert_allclose(got[name], want[name], rtol=2e-7, atol=1e-7)


# -- the factor-averaging cross-term --------------------------------------------------------------
def _layer(u: list[list[float]], vt: list[list[float]], bias: list[float]) -> dict[str, np.ndarray]:
    return {"fc.out_network.weight": np.array(u, np.float32), "fc.in_network.weight": np.array(vt, np.float32),
            "fc.bias": np.array(bias, np.float32)}


def _product(arrays: dict[str, np.ndarray], top: int) -> np.ndarray:
    return arrays["fc.out_network.weight"][:, :top].astype(np.float64) @ arrays["fc.in_network.weight"][:top]


def test_ordered_products_average_the_products_per_level_where_factor_averaging_has_a_cross_term() -> None:
    """Hand-computed: A = (u=2e1, v=[1,0]) at rank 1, B = (u=e1, v=[2,0]; 2nd component e2 ⊗ [0,3]) at rank 2.

    Level [0,1): mean(u vᵀ) = ½(2·[1,0] + 1·[2,0]) = e1 ⊗ [2, 0]; factor averaging gives
    mean(u) mean(v)ᵀ = 1.5 e1 ⊗ [1.5, 0] = e1 ⊗ [2.25, 0]. Level [1,2): only B holds it: e2 ⊗ [0, 3].
    The global rank-3 layer's third component is held by nobody and keeps its value.
    """
    g = _layer([[0, 0, 7], [0, 0, 5]], [[0, 0], [0, 0], [1, 1]], [0, 0])
    a = _layer([[2], [0]], [[1, 0]], [1, 1])
    b = _layer([[1, 0], [0, 1]], [[2, 0], [0, 3]], [3, 5])
    updates = [(a, 1.0), (b, 1.0)]
    products = aggregate_ordered_products(g, updates)
    np.testing.assert_allclose(_product(products, 1), [[2, 0], [0, 0]], atol=1e-6)
    np.testing.assert_allclose(_product(products, 2) - _product(products, 1), [[0, 0], [0, 3]], atol=1e-6)
    np.testing.assert_array_equal(products["fc.out_network.weight"][:, 2], [7, 5])  # nobody's component: kept
    np.testing.assert_array_equal(products["fc.in_network.weight"][2], [1, 1])
    np.testing.assert_allclose(products["fc.bias"], [2, 3])  # dense: FedAvg
    factors = aggregate_ordered_factors(g, updates)
    np.testing.assert_allclose(_product(factors, 1), [[2.25, 0], [0, 0]], atol=1e-6)
    # the update of the held components is e1⊗[2,0] + e2⊗[0,3] (the global ones were 0): norm √13;
    # factor averaging is off by 0.25, the product rule by nothing
    assert cross_term_share(g, factors, updates)["fc"] == pytest.approx(0.25 / np.sqrt(13), rel=1e-6)
    assert cross_term_share(g, products, updates)["fc"] == pytest.approx(0.0, abs=1e-6)


def test_ordered_products_with_one_level_is_the_svd_rule() -> None:
    rng = np.random.default_rng(3)
    g = {"fc.out_network.weight": rng.standard_normal((4, 3)).astype(np.float32),
         "fc.in_network.weight": rng.standard_normal((3, 5)).astype(np.float32),
         "fc.bias": np.zeros(4, np.float32)}
    updates = [({k: (v + rng.standard_normal(v.shape)).astype(np.float32) for k, v in g.items()}, float(w))
               for w in (3, 1, 2)]
    ours, svd = aggregate_ordered_products(g, updates), aggregate_svd(g, updates)
    np.testing.assert_allclose(_product(ours, 3), _product(svd, 3), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours["fc.bias"], svd["fc.bias"], rtol=1e-6)
