"""Prefill of a generation batch: the prompts' KV cache and each row's first logits.

* `plain_prefill` — the model's own forward over the left-padded batch (what
  ``generate`` does). Not cut into length chunks: that rounds the prompt cache unlike
  the forward, and on the fidelity prompts (16, sharing only a 14-token system turn)
  the fast engine's mean |Δ log-prob| in bf16 on an AVX2 CPU rose to 1.47e-4 against
  ``generate``'s 1.39e-4, above the faithful bound (`ucai.generation_fidelity`).
* `shared_prefix_prefill` — prompts that begin alike (every prompt of a principle
  carries that principle's system prompt, ~59 of ~76 tokens in the preferences stage)
  have their common beginning computed once: the distinct prefixes run as one small
  batch, their keys and values are copied to every row that shares them, and the rows'
  remaining tokens run as a second batch attending to that cache. The row layout is
  then ``[pad | prefix | pad | suffix]`` with positions counted over real tokens only,
  so each row sees the positions and tokens it would see unpadded. The suffixes run in
  chunks of similar length (`length_chunks`), so a short one is not padded to the
  longest of the batch.

Rows are grouped by `prefix_groups`: sorted by their tokens, then cut into runs that
maximise the tokens saved, so prompts of one principle share its whole system prompt
even when every principle's prompt starts with the same few words.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from ucai.padding import position_ids


@dataclass
class Prefill:
    """A prefilled batch of B rows, W cache positions wide.

    Attributes:
        keys, values: per layer, (B, KVH, W, D) cached keys and values.
        mask: (B, W) 1 on cached prompt tokens, 0 on padding.
        last_position: (B, 1) position of each row's last prompt token.
        logits: (B, V) float32 logits of each row's first new token.
        computed_tokens: prompt tokens the forward passes ran (padding included).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    last_position: torch.Tensor
    logits: torch.Tensor
    computed_tokens: int


def cache_layers(cache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(keys, values) of every layer of a transformers cache, each (B, KVH, P, D)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [layer.keys for layer in layers], [layer.values for layer in layers]
    return [entry[0] for entry in cache], [entry[1] for entry in cache]


def _cache_argument(model) -> str:
    """The forward's name for a past cache: ``cache`` (transformers >= 5.25, which
    deprecates the old name) or ``past_key_values``."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _forward(model, input_ids, attention_mask, positions, past=None):
    extra = {} if past is None else {_cache_argument(model): past}
    # The last position as an index, not ``logits_to_keep=1``: the model then gathers a
    # contiguous (B, 1, H) copy instead of slicing, and a strided slice into a frozen
    # head (a LoRA policy's, or autocast's cast of one) runs as a batched matmul over a
    # copy of the head per row (SmolLM2 bf16, 16 rows: 1.15 s instead of 5 ms).
    last = torch.tensor([input_ids.shape[1] - 1], device=input_ids.device)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=last,
        **extra,
    )
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    return out.logits[:, -1].to(copy=True, dtype=torch.float32), cache


def plain_prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Prefill:
    """The model's forward over the left-padded prompts.

    Args:
        input_ids, attention_mask: (B, P) left-padded prompts.
    """
    positions = position_ids(attention_mask)
    logits, cache = _forward(model, input_ids, attention_mask, positions)
    keys, values = cache_layers(cache)
    return Prefill(keys, values, attention_mask, positions[:, -1:], logits, input_ids.numel())


def _common_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def prefix_groups(rows: list[list[int]], min_shared: int = 16) -> list[tuple[list[int], int]]:
    """Groups of rows that share a prefix, and the prefix length of each.

    Rows are sorted by their tokens (rows with a common prefix become neighbours); the
    sorted order is cut into contiguous groups maximising the tokens saved,
    sum over groups of (size - 1) x shared length, by dynamic programming. A group's
    shared length is its rows' common prefix, at most its shortest row minus one (the
    last prompt token must run with the row, to give the row its first logits); a
    group sharing fewer than ``min_shared`` tokens is split into single rows. A single
    row's prefix is the row minus its last token (it is computed once either way).

    Args:
        rows: B token lists (no padding), each at least one token.
    Returns:
        [(row indices, prefix length)] covering every row once.
    """
    order = sorted(range(len(rows)), key=lambda i: rows[i])
    count = len(order)
    # neighbour[k]: common prefix of sorted rows k and k + 1.
    neighbour = [_common_length(rows[order[k]], rows[order[k + 1]]) for k in range(count - 1)]
    best = [0] * (count + 1)  # best[i]: tokens saved by grouping the first i sorted rows
    cut = [0] * (count + 1)
    for end in range(1, count + 1):
        best[end], cut[end] = best[end - 1], end - 1  # row end-1 alone
        shared, shortest = None, len(rows[order[end - 1]])
        for start in range(end - 2, -1, -1):  # group = sorted rows start .. end-1
            shared = neighbour[start] if shared is None else min(shared, neighbour[start])
            shortest = min(shortest, len(rows[order[start]]))
            length = min(shared, shortest - 1)
            if length < min_shared:
                break  # extending further can only shorten the shared prefix
            saved = best[start] + (end - start - 1) * length
            if saved > best[end]:
                best[end], cut[end] = saved, start
    groups = []
    end = count
    while end > 0:
        start = cut[end]
        members = [order[k] for k in range(start, end)]
        if len(members) == 1:
            groups.append((members, len(rows[members[0]]) - 1))
        else:
            shared = min(_common_length(rows[members[0]], rows[m]) for m in members[1:])
            groups.append((members, min(shared, min(len(rows[m]) for m in members) - 1)))
        end = start
    return groups[::-1]


def _left_padded(rows: list[list[int]], pad_id: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), each (N, max length), of token lists padded on the left."""
    width = max(1, max(len(r) for r in rows))
    ids = like.new_full((len(rows), width), pad_id)
    mask = like.new_zeros((len(rows), width))
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=like.dtype)
            mask[i, width - len(row) :] = 1
    return ids, mask


def length_chunks(lengths: list[int], call_cost: int = 64) -> list[list[int]]:
    """Rows cut into chunks of similar length, each to run as one left-padded forward.

    Rows are sorted by length and cut where that lowers the padded tokens computed
    plus ``call_cost`` tokens per chunk (standing for a forward call's fixed cost and
    the smaller matmuls of a smaller batch; 64 is a chosen value, not a tuned one), by
    dynamic programming over the sorted order.

    Args:
        lengths: B row lengths in tokens.
    Returns:
        Row indices per chunk, shortest rows first; one chunk when cutting saves less
        than its cost.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = [0] + [None] * len(order)  # best[i]: cost of the first i sorted rows
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        width = lengths[order[end - 1]]  # the longest row of any chunk ending here
        for start in range(end):
            cost = best[start] + (end - start) * width + call_cost
            if best[end] is None or cost < best[end]:
                best[end], cut[end] = cost, start
    chunks = []
    end = len(order)
    while end > 0:
        chunks.append(order[cut[end] : end])
        end = cut[end]
    return chunks[::-1]


def shared_prefix_prefill(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pad_id: int,
    min_shared: int = 16,
    min_saving: float = 0.2,
    chunk_cost: int = 64,
) -> Prefill | None:
    """Prefill computing each shared prefix once (see the module docstring).

    Args:
        input_ids, attention_mask: (B, P) left-padded prompts.
        min_shared: shortest common prefix worth sharing, in tokens. Not lower: a
            recomputed prompt cache rounds unlike the model's forward, so sharing
            costs fidelity, and the evaluation's prompts ("You are a helpful
            assistant.", 14 tokens with SmolLM2's user header) stay unshared. Measured
            at 8, where they share it: an evaluation answer call (82 prompts, 48
            greedy tokens, fp32, 2 threads) 23.7 -> 19.3 s with the same answers, but
            the fast engine's mean |Δ log-prob| on the fidelity prompts (the same
            template) rose above ``generate``'s, 1.66e-4 against 1.39e-4 in bf16 on an
            AVX2 CPU and 6.94e-8 against 6.89e-8 in fp32, failing the faithful bound.
        min_saving: share only when the two passes run at least this fraction fewer
            tokens (padding included) than `plain_prefill`.
        chunk_cost: the suffixes run in chunks of similar length (`length_chunks`)
            where that saves more padded tokens than this many per extra chunk.
    Returns:
        The prefill, or None when sharing would not save ``min_saving``.
    """
    from transformers import DynamicCache

    rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask, strict=True)]
    if len(rows) < 2 or min(len(r) for r in rows) < 2:
        return None
    groups = prefix_groups(rows, min_shared)
    if len(groups) == len(rows):
        return None
    prefixes = [rows[members[0]][:length] for members, length in groups]
    group_of_row = [0] * len(rows)
    suffixes: list[list[int]] = [[] for _ in rows]
    for g, (members, length) in enumerate(groups):
        for m in members:
            group_of_row[m] = g
            suffixes[m] = rows[m][length:]
    prefix_width = max(len(p) for p in prefixes)
    suffix_width = max(len(s) for s in suffixes)
    chunks = length_chunks([len(s) for s in suffixes], chunk_cost)
    computed = len(groups) * prefix_width + sum(len(c) * max(len(suffixes[i]) for i in c) for c in chunks)
    if computed > (1 - min_saving) * input_ids.numel():
        return None

    prefix_ids, prefix_mask = _left_padded(prefixes, pad_id, input_ids)
    _, prefix_cache = _forward(model, prefix_ids, prefix_mask, position_ids(prefix_mask))
    prefix_keys, prefix_values = cache_layers(prefix_cache)
    del prefix_cache
    group_index = torch.tensor(group_of_row, device=input_ids.device)  # (B,) each row's prefix
    suffix_ids, suffix_mask = _left_padded(suffixes, pad_id, input_ids)  # (B, Ws)
    mask = torch.cat([prefix_mask.index_select(0, group_index), suffix_mask], dim=1)  # (B, Wp + Ws)
    positions = position_ids(mask)

    def run(rows: torch.Tensor, width: int):
        """The rows' suffixes (their last ``width`` columns, the rest padding) on their
        prefixes' cache: ((R, V) logits, per-layer (R, KVH, Wp + width, D) keys and values)."""
        cache = DynamicCache()
        for layer, (k, v) in enumerate(zip(prefix_keys, prefix_values, strict=True)):
            cache.update(k.index_select(0, group_index[rows]), v.index_select(0, group_index[rows]), layer)
        # The suffix columns left of ``width`` are padding in every row of the chunk.
        chunk_mask = torch.cat([mask[rows, :prefix_width], mask[rows, prefix_width + suffix_width - width :]], dim=1)
        logits, cache = _forward(model, suffix_ids[rows, -width:], chunk_mask, positions[rows, -width:], past=cache)
        return (logits, *cache_layers(cache))

    if len(chunks) == 1:
        logits, keys, values = run(torch.arange(len(rows), device=input_ids.device), suffix_width)
        return Prefill(keys, values, mask, positions[:, -1:], logits, computed)
    # Shorter suffixes run apart with less padding (23% of the preferences stage's suffix
    # tokens were padding in single batches); each chunk's cache is then put in the batch's
    # layout, its suffix right-aligned, the columns between zero (masked, and finite).
    logits = None
    keys, values = [], []
    for chunk in chunks:
        rows = torch.tensor(chunk, device=input_ids.device)
        width = max(len(suffixes[i]) for i in chunk)
        chunk_logits, chunk_keys, chunk_values = run(rows, width)
        if logits is None:
            logits = chunk_logits.new_empty((len(suffixes), chunk_logits.shape[1]))
            keys = [k.new_zeros((len(suffixes), k.shape[1], prefix_width + suffix_width, k.shape[3])) for k in chunk_keys]
            values = [v.new_zeros(k.shape) for v, k in zip(chunk_values, keys, strict=True)]
        logits[rows] = chunk_logits
        for full, part in zip(keys + values, chunk_keys + chunk_values, strict=True):
            full[rows, :, :prefix_width] = part[:, :, :prefix_width]
            full[rows, :, prefix_width + suffix_width - width :] = part[:, :, prefix_width:]
    return Prefill(keys, values, mask, positions[:, -1:], logits, computed)
