"""The Flower side of maestro-fl: the generic strategy, the ServerApp, and how runs are started.

* :mod:`strategies.submodel_strategy`: ``SubModelStrategy``, which runs any method of
  :mod:`maestro_fl.methods` over Flower's Message API;
* :mod:`strategies.server_app`: the ServerApp and its round loop;
* :mod:`strategies.runners`: Flower's simulation engine on Ray, an in-process grid, ``flwr run``;
* :mod:`strategies.sweeps`: sweeps and the method comparison;
* :mod:`strategies.api`: the Python API (``train``, ``simulate``, ``sweep``, ``compare`` with objects);
* :mod:`strategies.cli`: the ``maestro-fl`` command.
"""
