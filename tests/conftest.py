import copy
import os

# Tests never reach a hub: everything they load is local.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# ... and read no catalog folder of the user's: the built-in cards only, unless a test adds some.
os.environ.pop("VLM_LAB_CATALOG", None)

import pytest  # noqa: E402

import vlm_lab  # noqa: E402,F401  (registers the built-ins)
from vlm_lab import registry  # noqa: E402


@pytest.fixture
def clean_registry():
    """Let a test register names without leaking them into other tests."""
    saved = copy.copy({kind: dict(table) for kind, table in registry._constructors.items()})
    yield registry
    registry._constructors.clear()
    registry._constructors.update(saved)


@pytest.fixture
def user_catalogs(monkeypatch):
    """Let a test add catalog folders (``add_catalog``, ``$VLM_LAB_CATALOG``) that later tests never see."""
    monkeypatch.setattr(registry, "_added_catalogs", [])
    monkeypatch.delenv(registry.CATALOG_ENV, raising=False)
    return registry


TINY_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "tiny.yaml")


@pytest.fixture
def tiny_config():
    return vlm_lab.load_config(TINY_CONFIG)


@pytest.fixture
def tiny_module(tiny_config):
    return vlm_lab.build_module(tiny_config)


@pytest.fixture(autouse=True)
def restore_rank_zero():
    """Lightning keeps the process rank in a global (``rank_zero_only.rank``) that a Trainer built under
    simulated launcher variables (RANK=1) overwrites; restore it so later tests still log as rank 0."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    saved = getattr(rank_zero_only, "rank", 0)
    yield
    rank_zero_only.rank = saved
