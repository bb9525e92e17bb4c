"""The names a config may choose from: a leaf module, so that the config can check them without importing
what they name.

Each registry keeps its own objects (:data:`maestro_fl.models.MODELS`,
:data:`maestro_fl.methods.METHODS`, ...) and is keyed by the names here;
``tests/test_layout.py`` fails when the two drift apart.
"""

from __future__ import annotations

#: the built-in datasets (maestro_fl/data.py): digits is embedded in scikit-learn, mnist1d is generated
#: offline, the torchvision ones load from ``data_root``
DATASETS = ("digits", "mnist1d", "mnist", "fashion_mnist", "cifar10")

#: the zoo's models (maestro_fl/models.py), each built at any hidden width
MODELS = ("mlp", "cnn", "cnn1d", "lenet5", "resnet18", "vgg19")

#: normalization layers: BatchNorm, HeteroFL's static BatchNorm, GroupNorm, none
NORMS = ("bn", "sbn", "gn", "none")

#: ordered-dropout samplers of rank levels (maestro_fl/training.py)
SAMPLERS = ("per_layer", "across_layers", "nested", "tiers", "fixed", "none")

#: experiment trackers (maestro_fl/tracking.py); '' = the run directory's tables only
TRACKERS = ("", "tensorboard")

#: the federated methods (maestro_fl/methods/), in the order ``maestro-fl compare`` lists them
STRATEGIES = ("fedlod", "dlrt", "fedavg_dense", "fedavg_exclusive", "heterofl", "fjord", "fedhm", "fedrolex",
              "fedrolex_rank", "fiarse", "fiarse_rank", "flanc")
