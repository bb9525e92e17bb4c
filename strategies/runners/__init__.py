"""Ways to run a federation: Flower's simulation engine on Ray, an in-process grid, and ``flwr run``."""
