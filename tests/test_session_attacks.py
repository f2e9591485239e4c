"""The attacks on sessions (tests/attacks/sessions.py) against real servers on loopback: each is
stopped, the server gets back what the attacker held, and an honest client generating at the same
time keeps transformers' tokens exactly."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
import trio

from swarm_node.model import Checkpoint, ClientHead
from swarm_node.node.client.generation import SamplingConfig, generate_tokens
from swarm_node.node.client.settings import SessionSettings
from tests.attacks import Attack, AttackTarget
from tests.attacks.sessions import (
    attack_bad_keep,
    attack_bad_reorder,
    attack_oversized_prompt,
    attack_pings_only,
    attack_session_hoard,
    never_reads,
)
from tests.model_fixtures import reference_model
from tests.swarm_helpers import local_swarm


@asynccontextmanager
async def under_attack(
    model: Path, attack: Attack, **server_fields: Any
) -> AsyncIterator[tuple[bool, list[Any]]]:
    """Run ``attack`` on the first of two servers while an honest client generates, again and
    again until the attack is over, each time checked against transformers; then (whether it was
    stopped, the servers' BlockServers), the swarm still up."""
    torch.manual_seed(0)
    input_ids = torch.randint(0, 256, (1, 7))
    expected = reference_model(model).generate(
        input_ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    head = ClientHead.load(Checkpoint.open(model))
    async with local_swarm(model, [(0, 3), (3, 6)], **server_fields) as (servers, client):
        target = AttackTarget(
            model=model.name, model_path=model, servers=tuple(p.addrs[0] for p in servers)
        )
        over = trio.Event()
        stopped: list[bool] = []

        async def attack_it() -> None:
            stopped.append(await attack(target))
            over.set()

        async def generate() -> None:
            runs = 0
            while runs == 0 or not over.is_set():
                ids, _ = await generate_tokens(
                    client,
                    head,
                    input_ids,
                    SessionSettings(model=model.name, num_blocks=6),
                    SamplingConfig(max_new_tokens=10),
                )
                assert ids.tolist() == expected.tolist()
                runs += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(attack_it)
            nursery.start_soon(generate)
        yield stopped[0], [p.server for p in servers]


def all_released(server: Any) -> bool:
    return (
        server.active_sessions == 0
        and server.cache_tokens_left == server.config.cache_budget_tokens
        and not server.tokens_per_peer
    )


async def test_pings_do_not_keep_a_session_alive(tiny_llama: Path) -> None:
    # Any message used to restart the idle clock, so pinging held a session's cache forever; the
    # server now ends sessions on steps alone (idle_timeout after 0.3 s here)
    with trio.fail_after(90):
        async with under_attack(tiny_llama, attack_pings_only, session_idle_timeout=0.3) as (
            stopped,
            servers,
        ):
            assert stopped
            assert all_released(servers[0])


async def test_one_peer_hoarding_sessions_gets_its_share_and_others_still_get_in(
    tiny_llama: Path,
) -> None:
    # 4096-token sessions (4096 cache + 683 kept answer tokens each) on a 65536-token budget: with
    # the default share of one half, the hoarder gets 6 of them (16 were allowed by the session count
    # alone, which is more than the budget), and another peer still opens one
    with trio.fail_after(120):
        async with under_attack(tiny_llama, attack_session_hoard) as (stopped, servers):
            assert stopped
            assert servers[0].served.max_peer_tokens == 32768
            assert all_released(servers[0])


async def test_maximal_deep_prompts_and_lora_on_one_token_sessions_are_counted(
    tiny_llama: Path,
) -> None:
    # each session reserves 1 cache token but holds ~22 MB of prompts and LoRA (~14500 tokens'
    # bytes): counted, a peer gets 2 of them (its share), not 16
    with trio.fail_after(120):
        async with under_attack(tiny_llama, attack_oversized_prompt) as (stopped, servers):
            assert stopped
            assert all_released(servers[0])


async def test_a_client_that_never_reads_loses_its_session_at_the_send_deadline(
    tiny_llama: Path,
) -> None:
    # its unread answers fill the stream's window, the server's send waits: past --send-timeout (1 s
    # here) the server resets the stream and frees the session; the attack checks after 3 s (the
    # stream's own flow-control wait, 5 s in py-libp2p's yamux, would come too late)
    with trio.fail_after(120):
        attack = partial(never_reads, within=3.0)
        async with under_attack(tiny_llama, attack, send_timeout=1.0) as (stopped, servers):
            assert stopped
            assert all_released(servers[0])


async def test_bad_roll_backs_are_refused_and_the_session_goes_on(tiny_llama: Path) -> None:
    # 'keep' past the cache, unequal to the position or a forward "roll back": bad_request each,
    # the stream and session keep working, an honest roll back works
    with trio.fail_after(90):
        async with under_attack(tiny_llama, attack_bad_keep) as (stopped, servers):
            assert stopped
            assert all_released(servers[0])


async def test_reorders_naming_rows_the_session_lacks_are_refused(tiny_llama: Path) -> None:
    # beam search's 'reorder' indexes the cache's rows: out of range or of the wrong length is a
    # bad_request, the cache untouched, and the session goes on
    with trio.fail_after(90):
        async with under_attack(tiny_llama, attack_bad_reorder) as (stopped, servers):
            assert stopped
            assert all_released(servers[0])
