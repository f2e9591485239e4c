"""A late server costs about a second: deadlines that follow each slot's measured step times, and a
hedge on a spare server once a step is late. A slow server is not banned; the tokens stay exact.

The frozen (SIGSTOP) server in use is in tests/test_failover.py; here a server becomes 100x slower than
it was or more (a DelayProxy in front of it, its delay raised mid-generation), in client-star and push
chains."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import torch
import trio
import trio.testing

from swarm_node.dht.routing import Hop
from swarm_node.model import Checkpoint, ClientHead
from swarm_node.node.client.generation import (
    SamplingConfig,
    continue_tokens,
    open_token_session,
)
from swarm_node.node.client.hedging import hedged
from swarm_node.node.client.remote_sequential import RemoteSequential
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.client.step_deadlines import (
    FACTOR,
    FLOOR,
    HEDGE_EVERY,
    MIN_SAMPLES,
    HedgeBudget,
    StepTimes,
)
from swarm_node.node.config import ClientConfig, PeerConfig, ServerConfig
from swarm_node.node.peer import open_peer
from tests.delay_proxy import DelayProxy
from tests.model_fixtures import reference_model
from tests.swarm_helpers import LOOPBACK
from tests.training_reference import blocks_output, grads_across_a_freeze

NEW_TOKENS = 10
SLOW_AFTER = 5  # tokens before the server in use turns slow
SLOW_DELAY = 1.0  # seconds each way: a step takes 2 s more (ms before): a spare has ~1.5 s to win


def test_a_step_is_late_after_a_multiple_of_its_recent_kind_within_floor_and_ceiling() -> None:
    times = StepTimes()
    for _ in range(MIN_SAMPLES - 1):
        times.observe(1, 0.2)
    assert times.late_after(1, 60.0) == 60.0  # too few seen: only the ceiling
    times.observe(1, 0.2)
    assert times.late_after(1, 60.0) == pytest.approx(FACTOR * 0.2)
    assert times.late_after(256, 60.0) == 60.0  # a prefill chunk is another kind
    assert times.late_after(1, 0.5) == 0.5  # never past the ceiling
    fast = StepTimes()
    for _ in range(10):
        fast.observe(1, 0.001)
    assert fast.late_after(1, 60.0) == FLOOR
    for _ in range(3):  # a few slow ones among 13: the 90th percentile follows them
        fast.observe(1, 1.0)
    assert fast.late_after(1, 60.0) == pytest.approx(FACTOR * 1.0)


def test_hedges_stay_a_small_fraction_of_steps() -> None:
    budget = HedgeBudget()
    assert budget.allows()
    budget.spend()
    assert not budget.allows()
    budget.steps = HEDGE_EVERY
    assert budget.allows()
    for steps in range(1000):
        budget.steps = steps
        if budget.allows():
            budget.spend()
    assert budget.hedges <= 1 + 1000 // HEDGE_EVERY


class Late(Exception):
    pass


def _race(primary_s: float, primary_fails: bool, spare_s: float | None, spare_fails: bool = False):
    """hedged() on trio's mock clock: a primary answering (or failing) after ``primary_s``, a spare
    answering after ``spare_s`` more (None: it has nothing). Returns (result or the exception,
    the clock when it came, whether the spare was asked)."""
    asked: list[float] = []

    async def primary() -> str:
        await trio.sleep(primary_s)
        if primary_fails:
            raise Late("primary failed")
        return "primary"

    async def spare() -> str | None:
        asked.append(trio.current_time())
        if spare_s is None:
            return None
        await trio.sleep(spare_s)
        return None if spare_fails else "spare"

    async def main() -> tuple[object, float]:
        try:
            result: object = await hedged(primary, spare, 1.0, (Late,))
        except Late as exc:
            result = exc
        return result, trio.current_time()

    result, at = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return result, at, bool(asked)


def test_a_hedge_starts_only_when_late_and_the_first_answer_wins() -> None:
    result, at, asked = _race(0.4, False, 0.1)
    assert (result.value, result.by_spare, at, asked) == ("primary", False, 0.4, False)
    result, at, asked = _race(10.0, False, 0.5)  # late at 1.0; the spare answers at 1.5
    assert (result.value, result.by_spare, result.failure, at) == ("spare", True, None, 1.5)
    result, at, _ = _race(1.2, False, 0.5)  # late, but the primary still answers first
    assert (result.value, result.by_spare, at) == ("primary", False, 1.2)
    result, at, _ = _race(10.0, False, None)  # no spare: the primary, however late
    assert (result.value, at) == ("primary", 10.0)
    result, at, _ = _race(10.0, False, 0.5, spare_fails=True)
    assert (result.value, at) == ("primary", 10.0)


def test_a_failure_before_the_hedge_is_raised_and_one_during_it_waits_for_the_spare() -> None:
    result, at, asked = _race(0.3, True, 0.5)
    assert isinstance(result, Late) and at == 0.3 and not asked
    result, at, _ = _race(1.2, True, 0.5)  # failed while the spare worked: the spare's answer
    assert (result.value, result.by_spare, at) == ("spare", True, 1.5)
    assert isinstance(result.failure, Late)
    result, at, _ = _race(1.2, True, 0.5, spare_fails=True)  # both: the primary's failure
    assert isinstance(result, Late) and at == 1.5


async def _generate_while_slowing(
    tiny_llama: Path, *, spare: bool, push: bool = False
) -> tuple[list[int], bool, int]:
    """Greedy tokens on the chain [0:3, 3:6] whose server of 3:6 (behind a proxy) turns slow after
    SLOW_AFTER tokens; with ``spare``, a second server of 3:6 is there. Returns the tokens, whether
    the slow server ended up banned, and how many hedges moved a slot."""
    torch.manual_seed(0)
    input_ids = torch.randint(0, 256, (1, 5))
    head = ClientHead.load(Checkpoint.open(tiny_llama))

    def server(start: int, end: int) -> ServerConfig:
        return ServerConfig(model=str(tiny_llama), start=start, end=end, throughput=100.0)

    async with trio.open_nursery() as nursery:
        async with AsyncExitStack() as stack:
            proxy = DelayProxy(target_port=0, delay=0.0)
            port = await nursery.start(proxy.run)
            slow = await stack.enter_async_context(
                open_peer(
                    PeerConfig(listen=LOOPBACK, announce_addrs=(f"/ip4/127.0.0.1/tcp/{port}",)),
                    server=server(3, 6),
                )
            )
            proxy.target_port = int(slow.host.get_transport_addrs()[0].value_for_protocol("tcp"))
            entry = PeerConfig(listen=LOOPBACK, initial_peers=tuple(slow.addrs))
            first = await stack.enter_async_context(open_peer(entry, server=server(0, 3)))
            spares = [
                await stack.enter_async_context(open_peer(entry, server=server(3, 6)))
                for _ in range(spare)
            ]
            client = await stack.enter_async_context(
                open_peer(entry, client=ClientConfig(step_timeout=20.0, push=push))
            )
            records: dict = {}
            while len(records) < 2 + spare:
                records.update(
                    (r.peer_id, r) for r in await client.find_servers(tiny_llama.name, 6)
                )
            for peer in spares:  # connected before the test's clock starts (a loaded CI machine
                await client.ping(peer.peer_id)  # may need seconds for a first handshake)

            def slow_down(token: torch.Tensor) -> None:
                nonlocal made
                made += 1
                if made == SLOW_AFTER:
                    proxy.delay = SLOW_DELAY

            made = 0
            settings = SessionSettings(
                model=tiny_llama.name,
                num_blocks=6,
                dtype="float32",
                max_length=input_ids.shape[1] + NEW_TOKENS,
                push=push,
            )
            chain = [Hop(records[first.peer_id], 0, 3), Hop(records[slow.peer_id], 3, 6)]
            async with open_token_session(client, settings, chain=chain) as ts:
                out, _ = await continue_tokens(
                    head, ts, input_ids, SamplingConfig(max_new_tokens=NEW_TOKENS), slow_down
                )
                recovery = ts.session.recovery
            banned = client.bans.is_banned(slow.peer_id, trio.current_time())
        nursery.cancel_scope.cancel()  # the proxy
    assert recovery is not None
    assert not recovery.events  # no server failed: late is not failed
    return out[0].tolist(), banned, len(recovery.hedges)


@pytest.mark.parametrize(
    ("spare", "push"),
    [(False, False), (True, False), (True, True)],
    ids=["no-spare", "spare", "spare-push"],
)
async def test_a_server_turned_slow_is_hedged_not_banned_and_the_tokens_stay_exact(
    tiny_llama: Path, spare: bool, push: bool
) -> None:
    torch.manual_seed(0)
    input_ids = torch.randint(0, 256, (1, 5))
    expected = reference_model(tiny_llama).generate(
        input_ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    with trio.fail_after(120):
        ids, banned, hedges = await _generate_while_slowing(tiny_llama, spare=spare, push=push)
    assert ids == expected[0].tolist()
    assert not banned
    assert hedges == (1 if spare else 0)  # with a spare, the first late step moves the slot there


async def test_an_idle_session_replaces_a_frozen_server_before_the_next_step(
    tiny_llama: Path,
) -> None:
    """A chat waiting for its user: the session sits idle, its server freezes (a proxy that holds
    every byte), and the idle watch's ping finds it and moves its blocks to the spare before the
    next step is asked for; the tokens across both turns are transformers' exactly."""
    torch.manual_seed(0)
    input_ids = torch.randint(0, 256, (1, 5))
    turns = (3, 4)
    expected = reference_model(tiny_llama).generate(
        input_ids, max_new_tokens=sum(turns), do_sample=False, eos_token_id=None, pad_token_id=0
    )
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    server = ServerConfig(model=str(tiny_llama), start=0, end=6, throughput=100.0)
    config = ClientConfig(step_timeout=2.0, idle_ping=0.3)
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            async with AsyncExitStack() as stack:
                proxy = DelayProxy(target_port=0, delay=0.0)
                port = await nursery.start(proxy.run)
                frozen = await stack.enter_async_context(
                    open_peer(
                        PeerConfig(listen=LOOPBACK, announce_addrs=(f"/ip4/127.0.0.1/tcp/{port}",)),
                        server=server,
                    )
                )
                tcp = frozen.host.get_transport_addrs()[0].value_for_protocol("tcp")
                proxy.target_port = int(tcp)
                entry = PeerConfig(listen=LOOPBACK, initial_peers=tuple(frozen.addrs))
                await stack.enter_async_context(open_peer(entry, server=server))
                client = await stack.enter_async_context(open_peer(entry, client=config))
                records: dict = {}
                while len(records) < 2:
                    records.update(
                        (r.peer_id, r) for r in await client.find_servers(tiny_llama.name, 6)
                    )
                settings = SessionSettings(
                    model=tiny_llama.name,
                    num_blocks=6,
                    dtype="float32",
                    max_length=input_ids.shape[1] + sum(turns),
                )
                chain = [Hop(records[frozen.peer_id], 0, 6)]
                async with open_token_session(client, settings, chain=chain) as ts:
                    first, _ = await continue_tokens(
                        head, ts, input_ids, SamplingConfig(max_new_tokens=turns[0])
                    )
                    proxy.delay = 1000.0  # frozen: nothing it is sent arrives
                    recovery = ts.session.recovery
                    while not recovery.events:  # the user thinks; the watch pings meanwhile
                        await recovery.changed.wait()
                    assert recovery.events[0].failed == frozen.peer_id
                    second, _ = await continue_tokens(
                        head, ts, first[:, :0], SamplingConfig(max_new_tokens=turns[1])
                    )
            nursery.cancel_scope.cancel()  # the proxy
    assert [*first[0].tolist(), *second[0, 0:].tolist()] == expected[0].tolist()


async def test_a_frozen_server_during_a_backward_is_hedged_and_the_gradients_stay_exact(
    tiny_llama: Path,
) -> None:
    """Training: two servers of blocks 3:6, each behind a proxy. After a few passes (the client
    learns what a backward of those blocks costs), the one that ran the last forward freezes before
    its backward: the backward goes to the other one too (which recomputes the forward), the
    gradients are those computed locally, and the frozen server is not banned (late, not failed)."""
    ref = reference_model(tiny_llama)
    torch.manual_seed(3)
    hidden, prompts, weight = (
        torch.randn(2, 6, 64),
        torch.randn(6, 2, 64) * 0.1,
        torch.randn(2, 6, 64),
    )
    h0, p0 = hidden.clone().requires_grad_(True), prompts.clone().requires_grad_(True)
    (blocks_output(ref, h0, p0) * weight).sum().backward()

    def server(start: int, end: int) -> ServerConfig:
        return ServerConfig(model=str(tiny_llama), start=start, end=end, throughput=100.0)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            async with AsyncExitStack() as stack:
                first = await stack.enter_async_context(
                    open_peer(PeerConfig(listen=LOOPBACK), server=server(0, 3))
                )
                entry = tuple(first.addrs[:1])
                proxies, peers = [], []
                for _ in range(2):
                    proxy = DelayProxy(target_port=0, delay=0.0)
                    port = await nursery.start(proxy.run)
                    config = PeerConfig(
                        listen=LOOPBACK,
                        initial_peers=entry,
                        announce_addrs=(f"/ip4/127.0.0.1/tcp/{port}",),
                    )
                    peer = await stack.enter_async_context(open_peer(config, server=server(3, 6)))
                    tcp = peer.host.get_transport_addrs()[0].value_for_protocol("tcp")
                    proxy.target_port = int(tcp)
                    proxies.append(proxy)
                    peers.append(peer)
                client = await stack.enter_async_context(
                    open_peer(
                        PeerConfig(listen=LOOPBACK, initial_peers=entry),
                        client=ClientConfig(step_timeout=20.0),
                    )
                )
                known: set[str] = set()
                while not {peer.peer_id for peer in peers} <= known:
                    known |= {r.peer_id for r in await client.find_servers(tiny_llama.name, 6)}
                for peer in peers:  # connected before timing starts
                    await client.ping(peer.peer_id)
                remote = RemoteSequential(client, model=tiny_llama.name, num_blocks=6, seed=0)

                def freeze(used: set[str]) -> str:
                    frozen = next(i for i, peer in enumerate(peers) if peer.peer_id in used)
                    proxies[frozen].delay = 1000.0  # nothing it is sent arrives any more
                    return peers[frozen].peer_id

                h_grad, p_grad, frozen_id = await trio.to_thread.run_sync(
                    lambda: grads_across_a_freeze(remote, hidden, prompts, weight, freeze, warm=4)
                )
                banned = client.bans.is_banned(frozen_id, trio.current_time())
            nursery.cancel_scope.cancel()  # the proxies
    torch.testing.assert_close(h_grad, h0.grad, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(p_grad, p0.grad, atol=1e-5, rtol=1e-6)
    assert remote.failures == 0 and not banned
    assert remote.hedged == 1
