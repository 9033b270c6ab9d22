"""ckptd: checkpoint/restart of Linux containers and process trees."""

__version__ = "0.1.0"
