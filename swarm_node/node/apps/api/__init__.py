"""An OpenAI-compatible HTTP API and a live swarm map, served by a peer (hypercorn's trio worker).

async with open_peer(config) as peer, open_api(peer, ApiConfig(port=8000)) as api:
    ...  # api.url serves /v1/models, /v1/completions, /v1/chat/completions, / (the swarm map),
    # /chat (the chat page) and /api/v1/state
"""

from swarm_node.node.apps.api.schema import ApiError
from swarm_node.node.apps.api.service import ApiConfig, ApiServer, open_api, serve_api

__all__ = ["ApiConfig", "ApiError", "ApiServer", "open_api", "serve_api"]
