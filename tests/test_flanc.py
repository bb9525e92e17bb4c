"""FLANC: shared bases, per-width coefficients; its server rule hand-computed on fake replies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from maestro_fl.aggregation import aggregate_flanc
from maestro_fl.footprint import footprint
from maestro_fl.methods.flanc import Composition, orthogonality
from strategies.submodel_strategy import to_numpy
from tests.fakes import fake_strategy, filled, messages, reply, sent, tiny_wide


@pytest.fixture(autouse=True)
def task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def test_the_rule_averages_bases_over_all_holders_and_anchors_within_their_width() -> None:
    """A (narrow) holds basis columns 0-1 and width 50's anchor; B and C (full) hold all columns and width 100's."""
    g = {"basis.x": np.full((2, 4), 9.0, dtype=np.float32), "widths.w050.a": np.full(3, 9.0, dtype=np.float32),
         "widths.w100.a": np.full(3, 9.0, dtype=np.float32), "widths.w025.a": np.full(3, 9.0, dtype=np.float32)}
    a = {"basis.x": np.full((2, 2), 1.0), "widths.w050.a": np.full(3, 1.0)}
    b = {"basis.x": np.full((2, 4), 3.0), "widths.w100.a": np.full(3, 3.0)}
    c = {"basis.x": np.full((2, 4), 5.0), "widths.w100.a": np.full(3, 5.0)}
    out = aggregate_flanc(g, [a, b, c])
    np.testing.assert_allclose(out["basis.x"][:, :2], 3.0)  # (1 + 3 + 5) / 3: every client holds these columns
    np.testing.assert_allclose(out["basis.x"][:, 2:], 4.0)  # (3 + 5) / 2
    np.testing.assert_allclose(out["widths.w050.a"], 1.0)  # its width's one client
    np.testing.assert_allclose(out["widths.w100.a"], 4.0)  # unweighted within the width
    np.testing.assert_allclose(out["widths.w025.a"], 9.0)  # no client of that width: unchanged
    assert all(out[k].dtype == np.float32 for k in out)


def test_clients_hold_the_bases_and_their_own_widths_anchor_and_merge_back() -> None:
    strategy, arrays = fake_strategy("flanc", [0.5, 1.0], [10, 30], build=tiny_wide, keep_first=0)
    a, b = messages(strategy, arrays, 1)
    got_a, got_b = sent(a), sent(b)
    assert {k.split(".")[1] for k in got_a if k.startswith("widths.")} == {"w050"}
    assert {k.split(".")[1] for k in got_b if k.startswith("widths.")} == {"w100"}
    assert got_a["basis.0"].shape == got_b["basis.0"].shape == (2, 6)  # ⌈0.25·8⌉ filters over the 6 inputs
    assert got_a["widths.w050.0.coefficients.weight"].shape == (4, 2)  # 4 of 8 hidden units from 2 basis outputs
    g = to_numpy(strategy.aggregate_train(1, [reply(a, filled(a, 11.0), 10), reply(b, filled(b, 33.0), 30)])[0])
    np.testing.assert_allclose(g["basis.0"], 22.0)  # shared: both clients, unweighted as the official sync
    np.testing.assert_allclose(g["widths.w050.2.weight"], 11.0)
    np.testing.assert_allclose(g["widths.w100.2.weight"], 33.0)
    before = to_numpy(arrays)
    np.testing.assert_array_equal(g["widths.w075.2.weight"], before["widths.w075.2.weight"])  # no client: kept
    for row, m, p in zip(sorted(strategy.client_rounds, key=lambda r: r.partition_id), (a, b), (0.5, 1.0)):
        held = sum(v.nbytes for v in sent(m).values())
        model = strategy.method.family.client_model(p, {})
        assert row.bytes_down == row.bytes_up == held == footprint(model, (6,)).bytes("fp32")


@pytest.mark.parametrize("layer", [nn.Linear(6, 5), nn.Conv1d(3, 5, 3, padding=1), nn.Conv2d(3, 5, 3, stride=2)])
def test_a_composed_layer_is_the_layer_whose_weight_is_coefficients_times_basis(layer: nn.Module) -> None:
    torch.manual_seed(0)
    comp = Composition(layer, "k", rank=2)
    fan_in = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    basis = torch.randn(2, fan_in, *getattr(layer, "kernel_size", ()))
    comp.__dict__["basis"] = basis
    coeff = comp.coefficients.weight.reshape(comp.coefficients.weight.shape[0], 2)
    weight = torch.einsum("or,r...->o...", coeff, basis)
    x = torch.randn(4, fan_in) if isinstance(layer, nn.Linear) else torch.randn(4, fan_in, *(8,) * (weight.ndim - 2))
    if isinstance(layer, nn.Linear):
        expected = F.linear(x, weight, comp.coefficients.bias)
    elif isinstance(layer, nn.Conv1d):
        expected = F.conv1d(x, weight, comp.coefficients.bias, padding=1)
    else:
        expected = F.conv2d(x, weight, comp.coefficients.bias, stride=2)
    torch.testing.assert_close(comp(x), expected)


def test_the_orthogonality_penalty_is_zero_for_orthonormal_bases_and_hand_computed_otherwise() -> None:
    strategy, _ = fake_strategy("flanc", [1.0], build=tiny_wide, keep_first=0)
    model = strategy.method.family.client_model(1.0, {})
    with torch.no_grad():
        model.basis["0"].copy_(torch.eye(2, 6))
    assert float(orthogonality(model)) == pytest.approx(0.0)
    with torch.no_grad():
        model.basis["0"].mul_(2.0)  # gram 4·I: (4 - 1)² on 2 of 4 entries
    assert float(orthogonality(model)) == pytest.approx(4.5)
