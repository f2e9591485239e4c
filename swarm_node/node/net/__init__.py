"""The node layer's one adapter to py-libp2p.

host.py builds the host (transport, security and muxer options live there and only there);
dialing.py reaches peers and opens protocol streams; message_stream.py carries whole protocol
messages on a stream; identity.py and swarm_key.py read and write the key files. No other module
of the node layer imports ``libp2p`` (dht/ keeps its own KadDHT adapter). This room knows nothing of
sessions, blocks or models.
"""
