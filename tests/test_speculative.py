"""Speculative decoding across the swarm: the servers' cache roll back ('keep'), greedy output equal to
transformers' with drafts all right, all wrong, cut by max_new_tokens or a stop string, through push
and batching, and the fallback to plain decoding where a server cannot roll back."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import trio

from swarm_node.errors import ConfigError, RequestError, SessionError
from swarm_node.model import BlockSpan, Checkpoint, ClientHead
from swarm_node.node.client.drafting import DraftLength, Match, PromptLookup
from swarm_node.node.client.generation import SamplingConfig, generate_tokens
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.client.speculative import Speculation
from swarm_node.node.config import ClientConfig
from swarm_node.protocol.messages import StepRequest
from swarm_node.protocol.server_session import SessionRules
from swarm_node.protocol.tensors import WireTensor
from tests.model_fixtures import make_tiny_model_dir, reference_model
from tests.swarm_helpers import local_swarm

NEW = 16
CHAINS = {1: [(0, 6)], 2: [(0, 3), (3, 6)]}


class Oracle:
    """Drafts the reference continuation (``shift`` 0: all right) or tokens it never picks."""

    def __init__(self, expected: list[int], prompt_len: int, shift: int = 0) -> None:
        self.expected, self.prompt_len, self.shift = expected, prompt_len, shift

    def draft(self, ids: list[int], k: int) -> list[int]:
        future = self.expected[len(ids) : len(ids) + k]
        return [(t + self.shift) % 256 for t in future]


def reference_ids(model: Path, input_ids: torch.Tensor, new: int = NEW) -> list[int]:
    out = reference_model(model).generate(
        input_ids, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0].tolist()


def fixed(drafter: object, tokens: int = 4) -> Speculation:
    """Drafting every step (no adaptive switch-off): the tests count what it does."""
    return Speculation(drafter=drafter, length=DraftLength(max_tokens=tokens, adaptive=False))


def settings(model: Path, **fields: object) -> SessionSettings:
    return SessionSettings(model=model.name, num_blocks=6, dtype="float32", **fields)


def test_cache_rollback_is_bit_for_bit(tiny_llama: Path) -> None:
    """A cache rolled back after rejected positions holds the numbers of one that never saw them,
    and the next step's output is the same to the bit."""
    checkpoint = Checkpoint.open(tiny_llama)
    span = BlockSpan.load(checkpoint, 0, 6)
    torch.manual_seed(3)
    prompt, step, rejected, nxt = (torch.randn(1, n, 64) for n in (5, 2, 3, 1))
    with torch.inference_mode():
        rolled = span.new_cache(16)
        span(prompt, rolled)
        span(torch.cat([step, rejected], dim=1), rolled)  # 5 positions verified at once
        rolled.truncate(7)
        clean = span.new_cache(16)
        span(prompt, clean)
        span(torch.cat([step, torch.randn(1, 3, 64)], dim=1), clean)  # other rejected tokens
        clean.truncate(7)
        assert rolled.length == clean.length == 7
        for a, b in zip(rolled.dynamic.layers, clean.dynamic.layers, strict=True):
            assert a.keys.shape[-2] == 7
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        after = span(nxt, rolled)
        assert torch.equal(after, span(nxt, clean))
        never = span.new_cache(16)  # never saw any rejected position: the same within float noise
        span(prompt, never)
        span(step, never)
        torch.testing.assert_close(span(nxt, never), after, rtol=1e-4, atol=1e-4)
    with pytest.raises(SessionError, match=r"'length' must be an int in \[0, 8\]"):
        rolled.truncate(9)


def test_keep_rules_and_old_servers() -> None:
    """'keep' must equal 'position' and not pass the cache; a session that cannot roll back
    refuses it, and an old server (it drops the unknown field) refuses the position clearly."""
    hidden = WireTensor("none", "float32", (1, 2, 64), bytes(512))
    rules = SessionRules(session_id="s", max_length=32, keeps=True)
    rules.step(StepRequest("s", 1, 7, hidden, keep=7), cache_length=9)
    for keep, position in ((10, 10), (7, 8)):
        with pytest.raises(RequestError, match="'keep' must be at most the session's cache length"):
            rules.step(StepRequest("s", 2, position, hidden, keep=keep), cache_length=9)
    unable = SessionRules(session_id="s", max_length=32)
    with pytest.raises(RequestError, match="'keep' must be -1 here"):
        unable.step(StepRequest("s", 1, 7, hidden, keep=7), cache_length=9)
    old_server_sees = replace(StepRequest("s", 1, 7, hidden, keep=7), keep=-1)
    with pytest.raises(RequestError, match="'position' must equal the session's cache length 9"):
        unable.step(old_server_sees, cache_length=9)


def test_prompt_lookup_drafts_the_longest_then_latest_continuation() -> None:
    lookup = PromptLookup(max_ngram=2, min_ngram=1)
    assert lookup.draft([1, 2, 3, 4, 1, 2, 5, 6, 1, 2], 3) == [5, 6, 1]  # equally long: latest
    assert lookup.draft([1, 2, 3, 9, 3], 2) == [9, 3]  # a 1-gram when no 2-gram matches
    assert lookup.draft([1, 2, 3], 4) == []
    assert PromptLookup().draft([1, 2, 3, 9, 3], 2) == []  # the default needs 2 tokens to match
    # the occurrence whose preceding tokens agree longest wins over a later, shorter one
    text = [7, 8, 1, 2, 3, 4, 9, 2, 3, 5, 7, 8, 1, 2, 3]
    assert PromptLookup().draft(text, 2) == [4, 9]
    assert PromptLookup(max_ngram=2).draft(text, 2) == [5, 7]
    found = PromptLookup().match(text)
    assert found is not None and (found.start, found.context, found.kind) == (5, 5, 2)
    assert [Match(start=0, context=c).kind for c in (1, 2, 5, 6, 40)] == [1, 2, 2, 6, 6]


def test_prompt_lookup_drafts_by_kind_of_match() -> None:
    """A lone token's match drafts by its own (lower) acceptance: its misses neither shorten nor
    turn off the drafts of long matches, which copy a passage."""
    length = DraftLength(max_tokens=10)
    spec = Speculation(drafter=PromptLookup(min_ngram=1), length=length)
    length.observe(0, 1, 0.10)
    lone = [5, 1, 2, 3, 4, 6, 7, 8, 4]  # only the last token, 4, occurred before
    long = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6]
    first_lone = len(spec.lookup(spec.drafter, lone, 100))
    first_long = len(spec.lookup(spec.drafter, long, 100))
    assert 1 <= first_lone < first_long  # priors: ~0.3 for a lone token, 0.7+ for long matches
    while drafts := spec.lookup(spec.drafter, lone, 100):  # lone-token drafts keep failing
        length.observe(len(drafts), 1, 0.10 + 0.003 * len(drafts))
    assert length.of(1).off_until > length.steps
    assert len(spec.lookup(spec.drafter, long, 100)) == first_long


@pytest.mark.parametrize(
    ("servers", "push", "shift"),
    [(1, False, 0), (2, True, 0), (2, False, 7), (2, True, 7)],
    ids=["1-server-all-right", "push-all-right", "all-wrong", "push-all-wrong"],
)
async def test_greedy_speculation_equals_transformers(
    tiny_llama: Path, servers: int, push: bool, shift: int
) -> None:
    torch.manual_seed(11)
    input_ids = torch.randint(0, 256, (1, 6))
    expected = reference_ids(tiny_llama, input_ids)
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    client = ClientConfig(push=push)
    with trio.fail_after(90):
        async with local_swarm(tiny_llama, CHAINS[servers], client=client) as (peers, client_peer):
            ids, stats = await generate_tokens(
                client_peer,
                head,
                input_ids,
                settings(tiny_llama, push=push),
                SamplingConfig(max_new_tokens=NEW),
                speculation=fixed(Oracle(expected, 6, shift)),
            )
            pushed = sum(p.server.pushed_steps for p in peers)
    assert ids[0].tolist() == expected
    assert stats.new_tokens == NEW and stats.draft_tokens > 0
    if shift:  # every draft rejected: one token a step, every step rolled back
        assert stats.accepted_tokens == 0 and stats.steps == NEW
    else:  # 4 drafts accepted each step: 1 + 5 + 5 + 5 tokens in 4 trips
        assert stats.accepted_tokens == NEW - stats.steps and stats.steps == 4
    if push:
        assert pushed == stats.steps  # the verification steps (and their roll backs) were pushed


async def test_cut_by_max_new_tokens_and_stop_then_continue(tiny_llama: Path) -> None:
    """Drafts never overrun max_new_tokens; a stop inside an accepted run ends there, and the
    session goes on from exactly the emitted tokens (the roll back travels with the next step)."""
    from swarm_node.node.client.generation import continue_tokens, open_token_session

    torch.manual_seed(12)
    input_ids = torch.randint(0, 256, (1, 5))
    expected = reference_ids(tiny_llama, input_ids, 20)
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    with trio.fail_after(90):
        async with local_swarm(tiny_llama, CHAINS[2]) as (_, client):
            ids, stats = await generate_tokens(
                client,
                head,
                input_ids,
                settings(tiny_llama),
                SamplingConfig(max_new_tokens=7),
                speculation=fixed(Oracle(expected, 5), tokens=5),
            )
            assert ids[0].tolist() == expected[:12] and stats.steps == 2  # 1 + 6 (5 drafts)
            stop_at = 5 + 3  # the stop fires on the third new token, inside a run of 5 drafts
            async with open_token_session(client, settings(tiny_llama, max_length=40)) as ts:
                ids, stats = await continue_tokens(
                    head,
                    ts,
                    input_ids,
                    SamplingConfig(max_new_tokens=12),
                    stopping=lambda ids: ids.shape[1] >= stop_at,
                    speculation=fixed(Oracle(expected, 5), tokens=5),
                )
                assert ids[0].tolist() == expected[:stop_at] and stats.finish_reason == "stop"
                assert ts.session.position == stop_at - 1 and ts.fed == stop_at - 1
                more, _ = await continue_tokens(
                    head, ts, input_ids[:, :0], SamplingConfig(max_new_tokens=20 - 3)
                )
    assert ids[0].tolist() + more[0].tolist() == expected


@pytest.fixture(scope="module")
def looping_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with small weights: its greedy text soon repeats itself (as edited code or a
    quoted passage does), so prompt lookup's drafts get accepted."""
    path = tmp_path_factory.mktemp("models") / "looping-llama"
    return make_tiny_model_dir(path, family="llama", num_layers=6, initializer_range=0.05)


async def test_prompt_lookup_with_batching_beside_a_plain_session(looping_llama: Path) -> None:
    """The default drafter on text that repeats, while another session's plain decode steps are
    batched on the same servers: both equal transformers."""
    model = looping_llama
    torch.manual_seed(1)
    repetitive = torch.randint(0, 256, (1, 6))
    other = torch.randint(0, 256, (1, 6))
    head = ClientHead.load(Checkpoint.open(model))
    results: dict[str, tuple] = {}
    with trio.fail_after(120):
        async with local_swarm(model, CHAINS[2]) as (_, client):

            async def run(name: str, ids: torch.Tensor, speculation: Speculation | None) -> None:
                results[name] = await generate_tokens(
                    client,
                    head,
                    ids,
                    settings(model),
                    SamplingConfig(max_new_tokens=24),
                    speculation=speculation,
                )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, "spec", repetitive, fixed(PromptLookup(), tokens=6))
                nursery.start_soon(run, "plain", other, None)
    spec_ids, spec_stats = results["spec"]
    assert spec_ids[0].tolist() == reference_ids(model, repetitive, 24)
    assert results["plain"][0][0].tolist() == reference_ids(model, other, 24)
    assert spec_stats.accepted_tokens >= 8 and spec_stats.steps <= 24 - 8


async def test_servers_that_cannot_roll_back_get_plain_decoding(tmp_path: Path) -> None:
    """Sliding-window layers cannot roll back: the servers say so at open ('keep' False) and the
    client decodes plainly, with the same tokens."""
    model = make_tiny_model_dir(tmp_path / "sliding", family="mistral", sliding_window=64)
    torch.manual_seed(14)
    input_ids = torch.randint(0, 256, (1, 6))
    expected = reference_ids(model, input_ids)
    head = ClientHead.load(Checkpoint.open(model))
    with trio.fail_after(90):
        async with local_swarm(model, CHAINS[2]) as (_, client):
            chain = await client.find_chain(model.name, 6)
            async with client.inference_session(chain, settings(model, max_length=8)) as s:
                assert not s.can_truncate
                await s.step(torch.randn(1, 2, 64))
                with pytest.raises(SessionError, match="do not take 'keep'"):
                    s.truncate(1)
            ids, stats = await generate_tokens(
                client,
                head,
                input_ids,
                settings(model),
                SamplingConfig(max_new_tokens=NEW),
                speculation=fixed(Oracle(expected, 6)),
            )
    assert ids[0].tolist() == expected
    assert stats.draft_tokens == 0 and stats.steps == NEW


class PartlyRight:
    """Drafts two right tokens, then wrong ones: every step accepts 2 and rolls back the rest."""

    def __init__(self, expected: list[int]) -> None:
        self.expected = expected

    def draft(self, ids: list[int], k: int) -> list[int]:
        future = self.expected[len(ids) : len(ids) + k]
        return [t if i < 2 else (t + 1) % 256 for i, t in enumerate(future)]


@pytest.mark.slow
async def test_a_server_killed_mid_speculation_recovers_to_the_same_tokens(tmp_path: Path) -> None:
    """SIGKILL of a `swarm-node serve` process between a verification step and the next (whose
    roll back it never hears): the replacement is replayed the accepted tokens only."""
    import signal

    from swarm_node.dht.routing import Hop
    from swarm_node.node.config import PeerConfig
    from swarm_node.node.peer import open_peer
    from tests.process_swarm import server_processes
    from tests.swarm_helpers import LOOPBACK

    model = make_tiny_model_dir(tmp_path / "tiny-spec-failover", num_layers=6, seed=5)
    torch.manual_seed(15)
    input_ids = torch.randint(0, 256, (1, 5))
    expected = reference_ids(model, input_ids, 20)
    head = ClientHead.load(Checkpoint.open(model))
    emitted: list[int] = []
    extra = ["--throughput", "100"]
    with trio.fail_after(180):
        async with server_processes(model, ["0:3", "3:6", "0:6"], extra=extra) as servers:
            victim = servers[1]

            def kill_after_five(token: torch.Tensor) -> None:
                emitted.append(int(token))
                if len(emitted) == 5:  # the first token of the second verification step
                    victim.process.send_signal(signal.SIGKILL)

            config = ClientConfig(step_timeout=3.0, retry_delay=0.2, max_attempts=3)
            peer_config = PeerConfig(listen=LOOPBACK, initial_peers=(servers[0].addr,))
            async with open_peer(peer_config, client=config) as client:
                records: dict = {}
                while not all(s.peer_id in records for s in servers[:2]):
                    found = await client.find_servers(model.name, 6)
                    records.update((r.peer_id, r) for r in found)
                chain = [
                    Hop(records[servers[0].peer_id], 0, 3),
                    Hop(records[victim.peer_id], 3, 6),
                ]
                ids, stats = await generate_tokens(
                    client,
                    head,
                    input_ids,
                    settings(model),
                    SamplingConfig(max_new_tokens=20),
                    chain=chain,
                    on_tokens=kill_after_five,
                    speculation=fixed(PartlyRight(expected), tokens=4),
                )
    assert ids[0].tolist() == expected
    (event,) = stats.recoveries
    assert event.failed == victim.peer_id
    assert stats.accepted_tokens > 0 and stats.draft_tokens > stats.accepted_tokens


def test_draft_length_adapts_and_turns_itself_off() -> None:
    from swarm_node.node.client import drafting

    assert DraftLength(max_tokens=6, adaptive=False).next(10) == 6
    assert DraftLength(max_tokens=6, adaptive=False).next(3) == 3
    length = DraftLength(max_tokens=12)
    first = length.next(100)
    assert 1 <= first < 12  # before anything is measured: the prior's guess, not the cap
    length.observe(0, 1, 0.10)  # a plain step: 0.10 s
    for _ in range(4):  # every draft accepted, each costing 1% of a plain step: draft the most
        k = length.next(100)
        length.observe(k, k + 1, 0.10 + 0.001 * k)
    assert length.next(100) == 12 and length.next(5) == 5
    assert length.acceptance == 1.0 and length.per_draft_s < 0.002

    cheap, dear = DraftLength(max_tokens=12), DraftLength(max_tokens=12)
    for length, per_draft in ((cheap, 0.001), (dear, 0.03)):  # half the drafts accepted
        length.observe(0, 1, 0.10)
        for _ in range(8):
            k = length.next(100)
            length.observe(k, k // 2 + 1, 0.10 + per_draft * k)
    assert 0 < dear.next(100) < cheap.next(100)  # dearer drafts: shorter ones

    length = DraftLength(max_tokens=12)  # drafts that never pay turn drafting off within steps
    length.observe(0, 1, 0.10)
    steps = 0
    while (k := length.next(100)) > 0:
        length.observe(k, 1, 0.10 + 0.01 * k)
        steps += 1
        assert steps < 12
    off_for = drafting.FIRST_BACKOFF
    assert length.of(0).off_until == length.steps + off_for
    for _ in range(off_for):
        assert length.next(100) == 0
        length.observe(0, 1, 0.10)
    assert length.next(100) > 0  # tried again; off for twice as long when it still does not pay
    while (k := length.next(100)) > 0:
        length.observe(k, 1, 0.10 + 0.01 * k)
    assert length.of(0).off_until == length.steps + 2 * off_for
    length.of(0).off_until = 0
    k = length.next(100)
    length.observe(k, 2, 0.10 + 0.01 * k)  # a draft accepted: the back-off starts over
    assert length.of(0).backoff == off_for
    with pytest.raises(ConfigError, match=r"'emitted' must be in \[1, 3\], got 4"):
        length.observe(2, 4, 0.1)


@pytest.mark.parametrize("layers", [6, 2], ids=["same-model", "truncated-copy"])
async def test_a_draft_model_drafts_and_greedy_stays_exact(tiny_llama: Path, layers: int) -> None:
    """A local draft model (here the target itself, or its first 2 blocks: a worse drafter)."""
    from transformers import AutoModelForCausalLM

    from swarm_node.node.client.drafting import DraftModel

    torch.manual_seed(16)
    input_ids = torch.randint(0, 256, (1, 6))
    expected = reference_ids(tiny_llama, input_ids, 20)
    draft = DraftModel(AutoModelForCausalLM.from_pretrained(tiny_llama, num_hidden_layers=layers))
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    with trio.fail_after(90):
        async with local_swarm(tiny_llama, CHAINS[2]) as (_, client):
            ids, stats = await generate_tokens(
                client,
                head,
                input_ids,
                settings(tiny_llama),
                SamplingConfig(max_new_tokens=20),
                speculation=fixed(draft, tokens=4),
            )
    assert ids[0].tolist() == expected
    assert stats.draft_tokens > 0
    if layers == 6:
        assert stats.accepted_tokens == stats.draft_tokens and stats.steps == 4


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
async def test_other_families_speculate_exactly(tmp_path: Path, family: str) -> None:
    """Tiny random models of the other families (llama above): drafts partly right, with push."""
    model = make_tiny_model_dir(tmp_path / family, family=family, num_layers=4, seed=7)
    torch.manual_seed(17)
    input_ids = torch.randint(0, 256, (1, 6))
    expected = reference_ids(model, input_ids)
    head = ClientHead.load(Checkpoint.open(model))
    with trio.fail_after(90):
        async with local_swarm(model, [(0, 2), (2, 4)], client=ClientConfig(push=True)) as (
            _,
            client,
        ):
            ids, stats = await generate_tokens(
                client,
                head,
                input_ids,
                SessionSettings(model=model.name, num_blocks=4, dtype="float32", push=True),
                SamplingConfig(max_new_tokens=NEW),
                speculation=fixed(PartlyRight(expected)),
            )
    assert ids[0].tolist() == expected
    assert stats.accepted_tokens > 0 and stats.draft_tokens > stats.accepted_tokens


@pytest.mark.slow
async def test_smollm2_speculates_exactly(smollm2_path: Path) -> None:
    """The real SmolLM2 quoting a passage: prompt lookup's drafts are accepted, greedy unchanged."""
    from swarm_node.model import load_tokenizer
    from swarm_node.node.apps.commands import encode_prompt

    passage = (
        "Peers find each other through a distributed hash table. Each server signs a record that "
        "names the blocks it holds, its addresses and its throughput."
    )
    tokenizer = load_tokenizer(smollm2_path)
    input_ids = encode_prompt(tokenizer, f"Repeat this text word for word:\n\n{passage}", chat=True)
    expected = reference_ids(smollm2_path, input_ids, 24)
    head = ClientHead.load(Checkpoint.open(smollm2_path))
    with trio.fail_after(240):
        async with local_swarm("smollm2-135m", [(0, 15), (15, 30)]) as (_, client):
            ids, stats = await generate_tokens(
                client,
                head,
                input_ids,
                SessionSettings(model="smollm2-135m", num_blocks=30, dtype="float32"),
                SamplingConfig(max_new_tokens=24),
                speculation=fixed(PromptLookup(), tokens=8),
            )
    assert ids[0].tolist() == expected
    assert stats.accepted_tokens >= 8 and stats.steps <= 16


async def test_speculation_through_a_compressed_chain(tiny_llama: Path) -> None:
    """float16 on the wire both ways (a verification step is just a wider tensor): the tiny
    model's margins are wide enough that greedy output stays transformers'."""
    torch.manual_seed(18)
    input_ids = torch.randint(0, 256, (1, 6))
    expected = reference_ids(tiny_llama, input_ids)
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    client = ClientConfig(compression="float16", push=True)
    with trio.fail_after(90):
        async with local_swarm(tiny_llama, CHAINS[2], client=client) as (_, client_peer):
            ids, stats = await generate_tokens(
                client_peer,
                head,
                input_ids,
                settings(tiny_llama, push=True, compression="float16"),
                SamplingConfig(max_new_tokens=NEW),
                speculation=fixed(PartlyRight(expected)),
            )
    assert ids[0].tolist() == expected
    assert stats.accepted_tokens > 0 and stats.draft_tokens > stats.accepted_tokens
