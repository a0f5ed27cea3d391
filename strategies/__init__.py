"""Server strategies, one module each, registered by name in `fedtail.registry.STRATEGIES`.

Each is a Flower strategy combined with `strategies.base.FedtailStrategy` and overrides only the hooks
its paper changes.
"""
