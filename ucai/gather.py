"""Python objects of every process, collected in rank order, and the weight of a
rank's mean in the mean over every rank's items.

Under DDP each rank computes on its own shard (prompts, items, rollouts); a summary or
a file written by rank 0 needs them all. Outside a distributed run (one process, or no
process group yet) there is nothing to collect and these return this process's own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def share_of_global_mean(count: int | float | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor | float:
    """``world · count / Σ counts``: the factor that turns this rank's mean over its
    ``count`` items (response tokens) into its part of the mean over every rank's items.

    DDP averages the ranks' gradients (÷ world), so a loss that is each rank's own mean
    would weigh a token of a rank with fewer tokens more than one of a rank with more;
    times this factor, the averaged gradient is that of the mean over the union, as one
    process given the union computes it. 1.0 outside distributed runs. Under DDP a
    scalar tensor on ``device`` (where the backend reduces: the loss's device), never
    read back to the host, so the step does not wait for the GPU. A collective: every
    rank must call it.
    """
    if not _distributed():
        return 1.0
    local = torch.as_tensor(count, dtype=torch.float32, device=device)
    total = local.clone()
    dist.all_reduce(total)
    return dist.get_world_size() * local / total.clamp(min=1.0)  # no rank has any: 0, the loss is 0 anyway


def gather_from_ranks(obj: Any) -> list[Any]:
    """``obj`` of every process, in rank order (a one-item list outside distributed runs).

    Every rank must call it (it is a collective), with a picklable ``obj``."""
    if _distributed():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]


def rows_from_all_ranks(rows: list) -> list:
    """Every process's ``rows`` concatenated in rank order (this process's own, as a new
    list, outside distributed runs). A distributed sampler pads the shards with repeats,
    so callers that need each row once de-duplicate by id."""
    return [row for part in gather_from_ranks(rows) for row in part]
