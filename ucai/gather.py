"""Python objects of every process, collected in rank order.

Under DDP each rank computes on its own shard (prompts, items, rollouts); a summary or
a file written by rank 0 needs them all. Outside a distributed run (one process, or no
process group yet) there is nothing to collect and these return this process's own.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def gather_from_ranks(obj: Any) -> list[Any]:
    """``obj`` of every process, in rank order (a one-item list outside distributed runs).

    Every rank must call it (it is a collective), with a picklable ``obj``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]


def rows_from_all_ranks(rows: list) -> list:
    """Every process's ``rows`` concatenated in rank order (this process's own, as a new
    list, outside distributed runs). A distributed sampler pads the shards with repeats,
    so callers that need each row once de-duplicate by id."""
    return [row for part in gather_from_ranks(rows) for row in part]
