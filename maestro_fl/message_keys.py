"""What the server and the clients say to each other: record keys, defined once.

``strategies`` and ``clients`` never import each other; both import these
names. Config keys are hyphenated, as Flower's own (``"server-round"``).
"""

from __future__ import annotations

# RecordDict entries
ARRAYS = "arrays"  # ArrayRecord: the (sub-)model, keyed by state_dict names
CONFIG = "config"  # ConfigRecord: what the server asks of this round (shared by the clients of one budget)
DEVICE = "device"  # ConfigRecord: the device the client is simulated on this round (DEVICE_* keys)
METRICS = "metrics"  # MetricRecord: what the client reports back

# The ClientApp, referenced as Flower references it ([tool.flwr.app.components]); the
# simulation runner loads it by this reference rather than importing it.
CLIENTAPP_REF = "clients.client_app:app"
# called with the RUN_CONFIG JSON when a Ray actor starts: it builds the data and model before any message
CLIENT_WARMUP_REF = "clients.client_app:warm"

# ConfigRecord keys (server -> client)
RUN_CONFIG = "run-config"  # the SimConfig as JSON: clients build data, model and method from it
SERVER_ROUND = "server-round"
LOCAL_EPOCHS = "local-epochs"
LR = "lr"
# the client's assignment (maestro_fl.methods.Assignment)
FRACTION = "fraction"  # float: the budget's rank or width fraction
RANKS = "ranks"  # list[int]: the client's rank per LoD layer, in the method's layer order ([] for width methods)
LEVELS = "levels"  # list[float]: the fractions its ordered dropout draws from, its own last
LEVEL_RANKS = "level-ranks"  # list[int]: the ranks of every level, level after level (rank methods)
LABEL_MASK = "label-mask"  # bool: train only the logits of the client's own classes (HeteroFL's masked classifier)
# the device the client is simulated on this round (in the DEVICE record)
DEVICE_MACS_PER_S = "device-macs-per-s"
DEVICE_UP_BPS = "device-up-bps"
DEVICE_DOWN_BPS = "device-down-bps"

# MetricRecord keys (client -> server); "num-examples" is Flower's weighting key
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
PARTITION_ID = "partition-id"
MACS = "macs"  # multiply-accumulates spent in local training, by the method's cost model
COMPUTE_SECONDS = "compute-seconds"  # simulated, from the device profile
DOWNLOAD_SECONDS = "download-seconds"
UPLOAD_SECONDS = "upload-seconds"
LABELS = "labels"  # list[int]: the classes in the client's training data (sent when asked for a label mask)
WALL_SECONDS = "wall-seconds"  # real seconds the ClientApp spent on the message (profiling the engine)

# Query (registration) reply keys: the device a client runs on
DEVICE_TIER = "device-tier"  # index into the tier table
DEVICE_MEMORY = "device-memory-bytes"
DEVICE_AVAILABILITY = "device-availability"
DEVICE_RANK_FRACTION = "device-rank-fraction"  # explicit per-tier fraction; 0 = derive from the device
