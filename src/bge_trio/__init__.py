"""bge-trio: a BGE-M3 embedding server (dense, sparse, ColBERT) on trio.

The server measures its model's memory behaviour at startup and packs the texts
of concurrent requests into batches that fit the container's memory limit.
"""

__version__ = "0.1.0"
