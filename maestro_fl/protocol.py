"""What the server and the clients say to each other: record keys, defined once.

``strategies`` and ``clients`` never import each other; both import these
names. Config keys are hyphenated, as Flower's own (``"server-round"``).
"""

from __future__ import annotations

# RecordDict entries
ARRAYS = "arrays"  # ArrayRecord: the (sub-)model, keyed by state_dict names
CONFIG = "config"  # ConfigRecord: what the server asks of this round
METRICS = "metrics"  # MetricRecord: what the client reports back

# The apps, referenced as Flower references them ([tool.flwr.app.components]); the
# simulation runner loads the ClientApp by this reference rather than importing it.
SERVERAPP_REF = "strategies.server_app:app"
CLIENTAPP_REF = "clients.client_app:app"

# ConfigRecord keys (server -> client)
RUN_CONFIG = "run-config"  # the SimConfig as JSON: clients build data and model from it
SERVER_ROUND = "server-round"
RANKS = "ranks"  # list[int]: the client's rank per LoD layer, in lod_layers() order
RANK_LEVELS = "rank-levels"  # list[int]: sampler 'tiers': the tiers' ranks up to the client's, level after level
WIDTH = "width"  # float: the client's hidden-width fraction (HeteroFL, FjORD); replaces RANKS
LABEL_MASK = "label-mask"  # bool: train only the logits of the client's own classes (HeteroFL's masked classifier)
WIDTHS = "widths"  # list[float]: the width levels its ordered dropout samples from (FjORD; [WIDTH] = none)
LOCAL_EPOCHS = "local-epochs"
LR = "lr"
BATCH_SIZE = "batch-size"
LAMBDA_GL = "lambda-gl"
SAMPLER = "sampler"
FULL_PASS = "full-pass"
DEVICE_MACS_PER_S = "device-macs-per-s"  # the profile the client is simulated with this round
DEVICE_UP_BPS = "device-up-bps"
DEVICE_DOWN_BPS = "device-down-bps"

# MetricRecord keys (client -> server); "num-examples" is Flower's weighting key
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
PARTITION_ID = "partition-id"
BYTES_RECEIVED = "bytes-received"
BYTES_SENT = "bytes-sent"
MACS = "macs"  # multiply-accumulates spent in local training
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
