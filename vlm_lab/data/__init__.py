"""Data modules. Importing this package registers them all."""

from vlm_lab.data import cc3m, coco, hf_datasets, synthetic  # noqa: F401  (registers)
