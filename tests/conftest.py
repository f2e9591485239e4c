from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.model_fixtures import make_tiny_model_dir

# One hypothesis profile for every test: no per-example deadline (2 shared cores make timings
# noise), and in CI (CI set) the same examples on every run, so a red build is reproducible.
settings.register_profile(
    "swarm",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=bool(os.environ.get("CI")),
)
settings.load_profile("swarm")


@pytest.fixture(autouse=True)
def _seeded_torch() -> None:
    # Every test sees the same random tensors on every run: no test may pass by luck of the draw.
    import torch

    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _quiet_libp2p() -> None:
    # py-libp2p logs routine DHT chatter as warnings.
    logging.getLogger("libp2p").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(
        tmp_path_factory.mktemp("models") / "tiny-llama", family="llama", num_layers=6
    )


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The bundled SmolLM2, converted once into the default cache folder."""
    from swarm_node.model import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_chat_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a byte-level tokenizer and a chat template (for API tests)."""
    from tests.model_fixtures import add_byte_tokenizer

    path = make_tiny_model_dir(
        tmp_path_factory.mktemp("models") / "tiny-chat", family="llama", num_layers=6
    )
    return add_byte_tokenizer(path)
