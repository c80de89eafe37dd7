"""Data modules. Importing this package registers them all."""

from vlm_lab.data import synthetic  # noqa: F401  (registers)
