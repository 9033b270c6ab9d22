"""Thin typed wrappers over the kernel: syscalls (ctypes), /proc, cgroup
freezers, namespaces, network devices. Imports nothing else of ckptd and
raises plain ``OSError(errno, message, target)``."""
