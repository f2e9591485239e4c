"""The names a user picks from, without importing torch: config, CLI and API check against these;
model/dtypes.py and compression/ map them to torch."""

DTYPES = ("float32", "bfloat16")  # what a span, a head, an adapter or a session computes in
CODECS = ("none", "float16", "bfloat16", "blockwise8", "blockwise8-64")  # wire codecs
