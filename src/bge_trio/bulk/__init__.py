"""Bulk embedding of a corpus: ``bge-trio embed``, on one machine or on Ray.

It uses the server's encoder, memory budget (with the probe cache) and batch
planner, not copies of them; pyarrow (and Ray, for ``--ray``) come from the
``bulk`` extra and are imported only here.
"""
