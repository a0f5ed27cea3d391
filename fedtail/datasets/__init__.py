"""Dataset plug-ins: one module per dataset, registered in `fedtail.registry.DATASETS`."""
