"""The dtypes a span, a head, an adapter or a wire tensor may be computed in: name -> torch dtype."""

from __future__ import annotations

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
