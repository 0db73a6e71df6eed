"""The memory model: how much memory a forward pass may use, and what a batch costs.

``budget`` finds the container's limit, ``cost`` is W(B, S) = a*B*S + b*B*S^2 and its
fit, ``probe`` measures real forward passes to fit it, ``cache`` keeps the fit
between starts.
"""
