"""The dtypes a span, a head, an adapter or a wire tensor may be computed in: name -> torch dtype."""

from __future__ import annotations

import torch

from swarm_node.choices import DTYPES

TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPES}
