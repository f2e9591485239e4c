"""8-bit (LLM.int8) and 4-bit (NF4) weights for a span: bitsandbytes' linear layers, on CPU too.

`quantize_linears(module, quant, compute_dtype=...)` swaps every `torch.nn.Linear` inside `module`
(already holding real float weights) for bitsandbytes' `Linear8bitLt` ("int8": per-row absmax int8
weights, outlier features above 6.0 computed in 16-bit) or `Linear4bit` ("nf4": 4-bit NormalFloat,
blocks of 64, double-quantized statistics). bitsandbytes is imported here only, and only when a
mode is asked for: importing it costs seconds. `weight_bytes(module)` counts what the weights
occupy, quantization statistics included. Knows nothing of spans, caches or peers.
"""

from __future__ import annotations

from typing import Any

import torch

from swarm_node.errors import ConfigError

QUANT_MODES = ("int8", "nf4")
INT8_OUTLIER_THRESHOLD = 6.0  # LLM.int8: input features beyond this run in 16-bit (as Petals)


def check_quant(quant: Any) -> str | None:
    if quant is not None and quant not in QUANT_MODES:
        raise ConfigError(f"'quant' must be one of {QUANT_MODES} or None, got {quant!r}")
    return quant


def quantize_linears(
    module: torch.nn.Module, quant: str, *, compute_dtype: torch.dtype, device: str = "cpu"
) -> int:
    """Replace each nn.Linear under `module` (float weights on the CPU) by its bitsandbytes form,
    quantized on `device` ("cpu", or "cuda" for bitsandbytes' GPU kernels), in place; -> count."""
    check_quant(quant)
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ConfigError(
            f"quant={quant!r} needs bitsandbytes: `pip install bitsandbytes` ({exc})"
        ) from exc
    targets = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Linear
    ]
    for parent, name, linear in targets:
        setattr(parent, name, _convert(bnb, linear, quant, compute_dtype, device))
    return len(targets)


def _convert(
    bnb: Any, linear: torch.nn.Linear, quant: str, compute_dtype: torch.dtype, device: str
) -> Any:
    has_bias = linear.bias is not None
    weight = linear.weight.data  # (out, in), float
    with torch.device("meta"):  # no float-sized placeholder weight
        if quant == "int8":
            new = bnb.nn.Linear8bitLt(
                linear.in_features,
                linear.out_features,
                bias=has_bias,
                has_fp16_weights=False,
                threshold=INT8_OUTLIER_THRESHOLD,
            )
        else:
            new = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=has_bias,
                compute_dtype=compute_dtype,
                compress_statistics=True,
                quant_type="nf4",
            )
    if quant == "int8":
        param = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        param = bnb.nn.Params4bit(
            weight, requires_grad=False, compress_statistics=True, quant_type="nf4"
        )
    new.weight = param.to(device)  # quantizes: bitsandbytes does it when a CPU tensor "moves"
    if has_bias:
        bias = linear.bias.data.to(device=device, dtype=compute_dtype)
        new.bias = torch.nn.Parameter(bias, requires_grad=False)
    new.requires_grad_(False)
    return new


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters and buffers under `module`, plus bitsandbytes' quantization stats."""
    seen: set[int] = set()
    total = 0

    def add(tensor: Any) -> None:
        nonlocal total
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            key = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
            if key not in seen:
                seen.add(key)
                total += tensor.untyped_storage().nbytes()

    for tensor in [*module.parameters(), *module.buffers()]:
        add(tensor)
        add(getattr(tensor, "SCB", None))  # int8: one float scale per output row
        state = getattr(tensor, "quant_state", None)
        while state is not None:  # nf4: absmax per block, the code; nested statistics too
            add(state.absmax)
            add(state.code)
            add(getattr(state, "offset", None))
            state = getattr(state, "state2", None)
    return total
