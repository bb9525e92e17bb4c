"""A real multi-node Ray cluster (a head and two worker nodes on this machine): a simulation and a sweep span it.

``ray.cluster_utils.Cluster`` starts a raylet per node, each with its own
resources, exactly as separate machines would. The head has no CPUs, so every
client actor and every sweep run must land on a worker node; each worker node
has one CPU, so the two client actors (and two concurrent sweep runs) land on
different nodes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from maestro_fl.config import SimConfig, resolve
from strategies.runners.launch import run_simulation
from strategies.sweeps.sweep import RESULT_FILE, run_sweep
from tests.test_ray_engine import assert_same_tables, config
from tests.test_simulation import always_online_population

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """The address of a three-node cluster: a head without CPUs and two worker nodes of one CPU each."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # this process connects to the cluster, not to the test run's local Ray
        ray.shutdown()

    small_store = 100 * 1024**2  # each node's object store: a few messages at a time, not 30% of the RAM
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": small_store,
                                                          "include_dashboard": False})
    try:
        for _ in range(2):
            nodes.add_node(num_cpus=1, object_store_memory=small_store)
        nodes.wait_for_nodes()
        yield nodes.address
    finally:
        nodes.shutdown()


def test_a_simulation_spreads_its_clients_over_the_nodes_and_gives_the_single_node_tables(
    tmp_path: Path, flwr_home: str, cluster: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(tmp_path, rounds=2, partition="dirichlet")
    with caplog.at_level(logging.INFO, logger="maestro_fl"):
        on_cluster = run_simulation(resolve(SimConfig, overrides={**vars(cfg), "backend": "ray", "ray_address": cluster,
                                                                   "run_name": "cluster"}))
    assert "2 client actor(s) started on 2 Ray node(s)" in caplog.text
    one_node = run_simulation(resolve(SimConfig, overrides={**vars(cfg), "backend": "local", "run_name": "one_node"}))
    assert_same_tables(on_cluster, one_node)
    assert (pd.read_csv(on_cluster / "clients.csv")["status"] == "ok").all()


def test_a_sweep_runs_on_several_nodes(tmp_path: Path, flwr_home: str, cluster: str) -> None:
    population = always_online_population(tmp_path / "population.csv", 4)
    (tmp_path / "sweep.toml").write_text(
        f'[sweep]\nname = "spread"\nout_dir = "{tmp_path}"\nray_address = "{cluster}"\ncpus_per_run = 1\n'
        f'[base]\nmodel = "mlp"\nnum_clients = 4\nclients_per_round = 4\nrounds = 1\nlocal_epochs = 1\n'
        f'partition = "iid"\ndevices = "{population}"\n'
        "[grid]\nseed = [0, 1, 2, 3]\n"
    )
    root = run_sweep(tmp_path / "sweep.toml")
    results = pd.read_csv(root / "results.csv")
    assert set(results["status"]) == {"ok"} and sorted(results["seed"].unique()) == [0, 1, 2, 3]
    placed = [json.loads(p.read_text()) for p in sorted(root.glob(f"*/{RESULT_FILE}"))]
    assert len(placed) == 4
    assert len({p["ray_node"] for p in placed}) == 2  # both worker nodes ran runs; the head (no CPUs) none
