"""Container lifecycle: spawn into namespaces through a per-container shim,
the freezer cgroup, the registry of containers, state that survives a restart.
``ContainerManager`` (manager.py) is the entry point."""
