"""swarm-node: run and fine-tune large language models over a peer-to-peer swarm.

Servers hold contiguous spans of transformer blocks; clients hold the embeddings, the final norm and
the LM head; hidden states travel peer to peer over py-libp2p.
"""

from __future__ import annotations

__version__ = "0.1.0"

from swarm_node.lazy_names import lazy_names
from swarm_node.threads import settle_threads

settle_threads()  # before anything loads torch (swarm_node/threads.py says why)

__all__ = [
    "ApiConfig",
    "ClientConfig",
    "DistributedModelForCausalLM",
    "DistributedModelForSequenceClassification",
    "PeerConfig",
    "RemoteSequential",
    "ServerConfig",
    "open_api",
    "open_peer",
    "serve_api",
]

_LAZY = {
    "open_peer": "swarm_node.node.peer",
    "DistributedModelForCausalLM": "swarm_node.node.distributed_model",
    "DistributedModelForSequenceClassification": "swarm_node.node.distributed_model",
    "RemoteSequential": "swarm_node.node.client.remote_sequential",
    "PeerConfig": "swarm_node.node.config",
    "ServerConfig": "swarm_node.node.config",
    "ClientConfig": "swarm_node.node.config",
    "ApiConfig": "swarm_node.node.apps.api",
    "open_api": "swarm_node.node.apps.api",
    "serve_api": "swarm_node.node.apps.api",
}


# lazy, so `import swarm_node` (and `swarm-node --help`) stays fast: torch and libp2p load on use
__getattr__ = lazy_names(__name__, _LAZY, globals())
