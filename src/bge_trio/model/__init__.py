"""The model layer: find a model directory, load it, and run forward passes.

``source`` finds the directory, ``pooling`` and ``heads`` hold the maths of the
three BGE-M3 outputs, ``encoder`` ties them to a tokenizer and a transformer.
"""
