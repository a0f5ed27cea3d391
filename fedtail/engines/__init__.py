"""Engines run one ServerApp against N ClientApps. Each module registers a runner in
`fedtail.registry.ENGINES` with the signature ``run(server_app, client_app_ref, cfg) -> None``;
``client_app_ref`` is an import path such as ``"clients.app:app"`` so that worker processes can load it.
"""

from __future__ import annotations

import importlib

from flwr.clientapp import ClientApp


def load_client_app(ref: str) -> ClientApp:
    """Import ``"module:attribute"`` and check that it is a ClientApp."""
    module, _, attr = ref.partition(":")
    obj = getattr(importlib.import_module(module), attr or "app")
    if not isinstance(obj, ClientApp):
        raise TypeError(f"{ref!r} is a {type(obj).__name__}, not a flwr ClientApp")
    return obj
