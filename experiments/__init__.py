"""Experiment files. The top-level ``*.yaml`` here ship inside the package as ``vlm_lab.experiments``
(setup.cfg ``package_dir``), so ``vlm-lab fit quickstart`` finds ``quickstart.yaml`` by name from an
installed wheel in any directory; ``lit/`` and ``sweeps/`` stay in the clone.
"""
