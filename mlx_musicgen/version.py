"""The package's version, read by the sidecars and the studio (a module of its own: no import reaches up)."""

__version__ = "0.1.0"
