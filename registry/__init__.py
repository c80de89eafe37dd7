"""The built-in catalog of cards: ``<kind>/<name>.yaml``, one folder per registry kind.

This folder is the one source of the cards. setup.cfg installs it as the package ``vlm_lab.catalog``
(``package_dir``), so a wheel carries the cards inside ``vlm_lab/catalog/`` and ``vlm_lab.registry``
finds them through ``importlib.resources``. docs/how-to/catalog.md explains the layout.
"""
