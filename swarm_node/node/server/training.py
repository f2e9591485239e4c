"""What a server runs for training clients: cache-less forward and backward passes over its blocks.

A backward recomputes the forward of the inputs the client sends, or, when the forward asked the
server to keep its graph (``keep_graph``) and the backward names it, runs on that graph
(kept_graphs.py; the inputs must be the same, else it recomputes: the answer never depends on the
cache). It returns the gradients for those inputs, for the client's deep prompts and for the
LoRA weights a client owns and sends along (or the server applies a named adapter it holds). The server's
own weights are frozen: ``torch.autograd.grad`` asks only for the inputs' gradients, so no weight ever
gets a ``.grad`` and no optimizer touches them. Every tensor a client sends is checked (shape, dtype,
size, finiteness of prompts) before any compute. Knows nothing of streams: server.py dispatches here.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import trio

from swarm_node import compression
from swarm_node.errors import ConfigError, RemoteProtocolError, RequestError
from swarm_node.model.lora_pack import manifest_entries, pack_lora, unpack_lora
from swarm_node.model.prompts import MAX_PRE_SEQ_LEN, check_prompts
from swarm_node.node.config import COMPRESSIONS
from swarm_node.node.quick_jobs import off_loop
from swarm_node.node.server.adapters import adapter_for
from swarm_node.node.server.compute_admission import check_compute, tensor_bytes
from swarm_node.node.server.kept_graphs import KeptGraph, SavedBytes
from swarm_node.protocol import messages as m
from swarm_node.protocol.messages import MAX_FORWARD_BATCH
from swarm_node.protocol.server_session import check_span


async def decode_prompts(server: Any, wire: Any, *, start: int, end: int) -> torch.Tensor | None:
    """The deep prompts of a request for blocks [start, end), checked, or None when it sent none."""
    if wire is None:
        return None
    hidden_size = server.span.hidden_size
    max_numel = (end - start) * MAX_PRE_SEQ_LEN * hidden_size
    try:
        prompts = await off_loop(
            functools.partial(compression.decode, wire, max_numel=max_numel), tensor_bytes(wire)
        )
    except RemoteProtocolError as exc:
        raise RequestError("bad_request", f"prompts: {exc}") from None
    dtype = server.span.dtype
    why = check_prompts(prompts, num_blocks=end - start, hidden_size=hidden_size, dtype=dtype)
    if why is not None:
        raise RequestError("bad_request", why)
    return prompts


async def decode_lora(server: Any, wire: Any, manifest: tuple, *, start: int, end: int) -> Any:
    """The client-owned LoRA of a request for blocks [start, end) (model.LoraWeights), checked, or
    None when it sent none. The manifest is checked first: it fixes how many numbers to accept."""
    if wire is None:
        if manifest:
            raise RequestError("bad_request", "'lora_manifest' came without 'lora'")
        return None
    shapes = server.span.lora_shapes
    try:
        _, numel = manifest_entries(manifest, shapes=shapes, start=start, end=end)
        decode = functools.partial(compression.decode, wire, max_numel=numel)
        flat = (await off_loop(decode, tensor_bytes(wire))).to(server.span.dtype)  # (N,)
        lora = unpack_lora(flat, manifest, shapes=shapes, start=start, end=end)
    except (ConfigError, RemoteProtocolError) as exc:
        raise RequestError("bad_request", f"lora: {exc}") from None
    if not bool(torch.isfinite(flat).all()):
        raise RequestError("bad_request", "lora: the weights must be finite, got inf or nan")
    return lora


async def _decode_batch(server: Any, wire: Any) -> torch.Tensor:
    return await server.decode_hidden(
        wire, batch=None, max_tokens=server.config.max_request_tokens, dtype=server.config.dtype
    )


async def _inputs(
    server: Any, req: m.ForwardRequest | m.BackwardRequest
) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
    """A forward's or backward's hidden states ``# (B, T, H)``, deep prompts and LoRA, checked: the
    sizes from the declared shapes first, then the tensors."""
    check_span(server.served, req.model, req.start, req.end)
    if req.compression not in COMPRESSIONS:
        raise RequestError(
            "bad_request", f"'compression' must be one of {COMPRESSIONS}, got {req.compression!r}"
        )
    declared = req.hidden.shape
    if len(declared) == 3 and declared[0] > MAX_FORWARD_BATCH:
        raise RequestError(
            "bad_request",
            f"a forward or backward takes at most {MAX_FORWARD_BATCH} sequences, got {declared[0]}",
        )
    grad = isinstance(req, m.BackwardRequest) or req.keep_graph
    check_compute(
        server.limits,
        req.hidden,
        model_config=server.span.config,
        dtype=server.config.dtype,
        kept_blocks=req.end - req.start if grad else 0,
    )
    if isinstance(req, m.BackwardRequest) and req.grad_output.shape != declared:
        raise RequestError(
            "bad_request",
            f"'grad_output' must have the shape of 'hidden' {declared}, got {req.grad_output.shape}",
        )
    hidden = await _decode_batch(server, req.hidden)  # (B, T, H)
    prompts = await decode_prompts(server, req.prompts, start=req.start, end=req.end)
    if prompts is not None and prompts.shape[1] > hidden.shape[1]:
        raise RequestError(
            "bad_request",
            f"prompts must cover at most the {hidden.shape[1]} positions sent, got {prompts.shape[1]}",
        )
    return hidden, prompts, await request_lora(server, req)


async def forward(server: Any, req: m.ForwardRequest, peer: str = "") -> m.ForwardResponse:
    """Blocks [start, end) on a batch of whole sequences, from position 0, without a cache; with
    ``keep_graph``, computed with grad and its graph kept for ``peer``'s backward."""
    hidden, prompts, lora = await _inputs(server, req)
    store = getattr(server, "kept_graphs", None)
    if not req.keep_graph or store is None:
        run = functools.partial(_forward, server.span, hidden, req.start, req.end, prompts, lora)
        out = await trio.to_thread.run_sync(run, limiter=server.compute_limiter)
        return m.ForwardResponse(hidden=await _encode(out, req.compression))
    run = functools.partial(
        _forward_kept, server.span, hidden, req.start, req.end, prompts, lora, req.lora is not None
    )
    graph = await trio.to_thread.run_sync(run, limiter=server.compute_limiter)
    graph.peer, graph.adapter = peer, req.adapter
    out = graph.out.detach()
    return m.ForwardResponse(hidden=await _encode(out, req.compression), graph_id=store.put(graph))


async def backward(server: Any, req: m.BackwardRequest, peer: str = "") -> m.BackwardResponse:
    """Gradients of ``sum(blocks(hidden) * grad_output)`` for ``hidden`` and the prompts."""
    hidden, prompts, lora = await _inputs(server, req)
    grad_output = await _decode_batch(server, req.grad_output)  # (B, T, H), as declared
    owned = req.lora is not None  # the client's own LoRA: its gradient goes back
    store = getattr(server, "kept_graphs", None)
    kept = store.take(req.graph_id, peer) if req.graph_id and store is not None else None
    wanted = (req.start, req.end, req.adapter)
    if kept is not None and (kept.start, kept.end, kept.adapter) != wanted:
        kept = None
    run = functools.partial(
        _backward, server.span, hidden, grad_output, req.start, req.end, prompts, lora, owned, kept
    )
    grad_input, grad_prompts, grad_lora, used = await trio.to_thread.run_sync(
        run, limiter=server.compute_limiter
    )
    if req.graph_id and store is not None:
        if used:
            store.hits += 1
        else:
            store.misses += 1
    codec = req.compression
    return m.BackwardResponse(
        grad_input=await _encode(grad_input, codec),
        grad_prompts=None if grad_prompts is None else await _encode(grad_prompts, codec),
        grad_lora=None if grad_lora is None else await _encode(grad_lora, "none"),  # exact
    )


async def _encode(tensor: torch.Tensor, codec: str) -> Any:
    return await off_loop(functools.partial(compression.encode, tensor, codec), tensor.nbytes)


async def request_lora(
    server: Any, req: m.OpenSessionRequest | m.ForwardRequest | m.BackwardRequest
) -> Any:
    """A named adapter the server holds or the client's own LoRA (not both), or None."""
    if req.lora is None and not req.lora_manifest:
        try:
            return adapter_for(server.adapters, req.adapter)
        except ConfigError as exc:
            raise RequestError("unknown_adapter", str(exc)) from None
    if req.adapter:
        raise RequestError("bad_request", "a request takes an 'adapter' name or a 'lora', not both")
    return await decode_lora(server, req.lora, req.lora_manifest, start=req.start, end=req.end)


def _forward(
    span: Any, hidden: torch.Tensor, start: int, end: int, prompts: torch.Tensor | None, lora: Any
) -> torch.Tensor:
    with torch.inference_mode():
        return span.forward(hidden, None, start=start, end=end, prompts=prompts, lora=lora)


def _graph(
    span: Any,
    hidden: torch.Tensor,
    start: int,
    end: int,
    prompts: torch.Tensor | None,
    lora: Any,
    owned: bool,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The forward with grad on leaf copies of the inputs (hidden[, prompts][, the owned LoRA, flat]):
    (output, leaves). The server's weights do not require grad, so they get none."""
    hidden = hidden.detach().requires_grad_(True)
    inputs = [hidden]
    if prompts is not None:
        prompts = prompts.detach().requires_grad_(True)
        inputs.append(prompts)
    if owned:  # views of one flat leaf: its gradient is the flat gradient the client expects
        flat, manifest = pack_lora(lora)
        flat = flat.detach().requires_grad_(True)
        lora = unpack_lora(flat, manifest, shapes=span.lora_shapes, start=start, end=end)
        inputs.append(flat)
    out = span.forward(hidden, None, start=start, end=end, prompts=prompts, lora=lora)  # (B, T, H)
    return out, inputs


def _forward_kept(
    span: Any,
    hidden: torch.Tensor,
    start: int,
    end: int,
    prompts: torch.Tensor | None,
    lora: Any,
    owned: bool,
) -> KeptGraph:
    saved = SavedBytes(exclude=[*span.parameters(), *span.buffers()])
    with torch.enable_grad(), saved.counting():
        out, inputs = _graph(span, hidden, start, end, prompts, lora, owned)
    return KeptGraph(
        peer="",
        start=start,
        end=end,
        out=out,
        inputs=inputs,
        has_prompts=prompts is not None,
        owned_lora=owned,
        adapter="",
        nbytes=saved.nbytes,
    )


def _same_inputs(
    kept: KeptGraph, hidden: torch.Tensor, prompts: torch.Tensor | None, lora: Any, owned: bool
) -> bool:
    """Whether the backward's inputs are exactly those the kept graph was computed from."""
    if kept.has_prompts != (prompts is not None) or kept.owned_lora != owned:
        return False
    sent = (
        [hidden]
        + ([prompts] if prompts is not None else [])
        + ([pack_lora(lora)[0]] if owned else [])
    )
    return len(kept.inputs) == len(sent) and all(
        a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.detach(), b)
        for a, b in zip(kept.inputs, sent, strict=True)
    )


def _backward(
    span: Any,
    hidden: torch.Tensor,
    grad_output: torch.Tensor,
    start: int,
    end: int,
    prompts: torch.Tensor | None,
    lora: Any,
    owned: bool,
    kept: KeptGraph | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, bool]:
    """(grad of hidden, of the prompts, of the owned LoRA, whether the kept graph served)."""
    used = kept is not None and _same_inputs(kept, hidden, prompts, lora, owned)
    with torch.enable_grad():
        if used:
            out, inputs = kept.out, kept.inputs
        else:
            out, inputs = _graph(span, hidden, start, end, prompts, lora, owned)
        grads = list(torch.autograd.grad(out, inputs, grad_output.to(out.device, out.dtype)))
    grad_flat = grads.pop() if owned else None
    return grads[0], (grads[1] if prompts is not None else None), grad_flat, used
