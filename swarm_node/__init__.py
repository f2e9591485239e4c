"""swarm-node: run and fine-tune large language models over a peer-to-peer swarm.

Servers hold contiguous spans of transformer blocks; clients hold the embeddings, the final norm and
the LM head; hidden states travel peer to peer over py-libp2p.
"""

from __future__ import annotations

__version__ = "0.1.0"
