"""The names a config may choose from: a leaf module, so that the config can check them without importing
what they name.

Each registry keeps its own objects (:data:`maestro_fl.models.MODELS`, ...) and
is keyed by the names here; ``tests/test_layout.py`` fails when the two drift
apart. The methods' registry is here itself (:data:`METHOD_CLASSES`), by reference.
"""

from __future__ import annotations

#: the built-in datasets (maestro_fl/data.py): digits is embedded in scikit-learn, mnist1d is generated
#: offline, the torchvision ones load from ``data_root``
DATASETS = ("digits", "mnist1d", "mnist", "fashion_mnist", "cifar10", "shakespeare")

#: built-in language tasks: their tables add the test loss and its perplexity to next-token accuracy
LANGUAGE_DATASETS = ("shakespeare",)

#: built-in datasets whose examples have a natural owner: ``partition=natural`` needs no ``partition_by``
NATURAL_GROUPS = {"shakespeare": "its speaking roles"}

#: the zoo's models (maestro_fl/models.py), each built at any hidden width
MODELS = ("mlp", "cnn", "cnn1d", "lenet5", "resnet18", "vgg19", "char_transformer")

#: normalization layers: BatchNorm, HeteroFL's static BatchNorm, GroupNorm, none
NORMS = ("bn", "sbn", "gn", "none")

#: ordered-dropout samplers of rank levels (maestro_fl/training.py)
SAMPLERS = ("per_layer", "across_layers", "nested", "tiers", "fixed", "none")

#: how the server's rounds meet the clients' updates (maestro_fl/server.py): synchronous rounds, FedBuff's buffer,
#: FedAsync's update-by-update merge
ROUND_MODES = ("sync", "fedbuff", "fedasync")

#: experiment trackers (maestro_fl/tracking.py), each with the packages it imports; ``tracking`` names none
#: ('' = the run directory's tables only), one or several (``tensorboard,mlflow``). MLflow's default store is a
#: SQLite database, which needs SQLAlchemy and Alembic (a server named by MLFLOW_TRACKING_URI does not)
TRACKERS: dict[str, tuple[str, ...]] = {"tensorboard": ("tensorboard",), "mlflow": ("mlflow", "sqlalchemy", "alembic")}


def tracker_names(tracking: str) -> tuple[str, ...]:
    """The trackers a ``tracking`` value names (``'tensorboard,mlflow'`` → both; ``''`` → none)."""
    return tuple(name.strip() for name in tracking.split(",") if name.strip())

#: the federated methods, the one registry: ``strategy`` name -> the class, as ``module:Class`` (imported when
#: first used, so that the config can check a name without importing the methods). Adding a method is its
#: module and one line here (docs/adding_a_method.md); ``maestro-fl compare`` lists them in this order
METHOD_CLASSES: dict[str, str] = {
    "fedlod": "maestro_fl.methods.fedlod:FedLoD",
    "dlrt": "maestro_fl.methods.dlrt_clients:DLRTClients",
    "fedavg_dense": "maestro_fl.methods.fedavg:FedAvgDense",
    "fedavg_exclusive": "maestro_fl.methods.fedavg:FedAvgExclusive",
    "heterofl": "maestro_fl.methods.heterofl_fjord:HeteroFL",
    "fjord": "maestro_fl.methods.heterofl_fjord:FjORD",
    "fedhm": "maestro_fl.methods.fedhm:FedHM",
    "fedrolex": "maestro_fl.methods.fedrolex:FedRolex",
    "fedrolex_rank": "maestro_fl.methods.fedrolex:FedRolexRank",
    "fiarse": "maestro_fl.methods.fiarse:FIARSE",
    "fiarse_rank": "maestro_fl.methods.fiarse:FIARSERank",
    "flanc": "maestro_fl.methods.flanc:FLANC",
}
