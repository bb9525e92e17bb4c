"""What the server and the clients say to each other: record keys, defined once.

``strategies`` and ``clients`` never import each other; both import these
names. Config keys are hyphenated, as Flower's own (``"server-round"``).
"""

from __future__ import annotations

# RecordDict entries
ARRAYS = "arrays"  # ArrayRecord: the (sub-)model, keyed by state_dict names
CONFIG = "config"  # ConfigRecord: what the server asks of this round (shared by the clients of one budget)
METRICS = "metrics"  # MetricRecord: what the client reports back

# The ClientApp, referenced as Flower references it ([tool.flwr.app.components]); the
# simulation runner loads it by this reference rather than importing it.
CLIENTAPP_REF = "clients.client_app:app"
# called with the RUN_CONFIG JSON when a Ray actor starts: it builds the data and model before any message
CLIENT_WARMUP_REF = "clients.client_app:warm"

# ConfigRecord keys (server -> client)
RUN_CONFIG = "run-config"  # the SimConfig as JSON: clients build data, model, method and local training from it
SERVER_ROUND = "server-round"
# the client's assignment (maestro_fl.methods.Assignment)
FRACTION = "fraction"  # float: the budget's rank or width fraction
RANKS = "ranks"  # list[int]: the client's rank per LoD layer, in the method's layer order ([] for width methods)
LEVELS = "levels"  # list[float]: the fractions its ordered dropout draws from, its own last
LEVEL_RANKS = "level-ranks"  # list[int]: the ranks of every level, level after level (rank methods)
LABEL_MASK = "label-mask"  # bool: train only the logits of the client's own classes (HeteroFL's masked classifier)

# MetricRecord keys (client -> server); "num-examples" is Flower's weighting key
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
PARTITION_ID = "partition-id"
SAMPLE_PASSES = "sample-passes"  # examples x forward/backward passes its local training ran (the server charges
# 3 x forward MACs of the sub-model it budgeted for each, at the device's speed: maestro_fl/server.py)
LABELS = "labels"  # list[int]: the classes in the client's training data (sent when asked for a label mask)
WALL_SECONDS = "wall-seconds"  # real seconds the ClientApp spent on the message (profiling the engine)
# a query (registration) reply holds PARTITION_ID and NUM_EXAMPLES: the server knows every client's device
# from the run's population (maestro_fl/population.py), so no client is told or asked its device
