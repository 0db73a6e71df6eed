"""Scheduling forward passes: the gate, batch planning, and the scheduler task.

``gate`` is the inference CapacityLimiter and its closed-at-start protocol,
``batching`` decides which waiting texts share a forward pass, ``work`` holds one
request's pending texts, and ``scheduler`` is the task that ties them together.
"""
