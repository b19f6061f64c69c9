"""Shared-prefix packing: one prefix, then several continuations of it, in ONE row.

Texts that share a beginning (a conversation and the replies to it: a preference pair,
RLOO's k samples of one prompt, the evaluation's answers of several models to one
prompt) can run through a decoder as one row ``[prefix | reply 1 | ... | reply K |
padding]`` instead of K rows that each repeat the prefix. A 4D attention mask lets every
reply token see the prefix and the earlier tokens of its own reply, nothing else, and
its position continues from the end of the prefix, so each token sees exactly the keys,
at the same positions, that it sees in its own sequence: the hidden states equal the
unpacked ones up to float rounding, gradients included, while the prefix is computed
once. The cost is attention over the masked-out part of the row (dense L x L), which
is why callers cap a row's length.

The row layout is described by (B, S) segment lengths: the prefix, then S - 1 replies;
a reply slot of length 0 is unused (rows with fewer replies than S).
"""

from __future__ import annotations

import torch

PREFIX = 0
PAD = -1

# Attention implementations that take a custom 4D mask as it is (flash-attention 2
# reads a 2D padding mask, so nothing is packed under it).
PACKING_ATTENTION = ("sdpa", "eager")

# Longest packed row of episodes (tokens): a prompt and RLOO's k samples of it fit
# (4 x 48 tokens after a 60-token prompt in the CPU experiment), and the dense
# attention over a row stays a small part of its work.
PACKED_ROW_TOKENS = 1024


def attention_takes_4d_mask(config) -> bool:
    """Whether a transformers model with this config can run packed rows: its attention
    takes a custom 4D mask, and it has no sliding window (a custom mask replaces the one
    transformers would build with the window, so long rows would see too far back)."""
    window = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return getattr(config, "_attn_implementation", None) in PACKING_ATTENTION and not window


def packed_layout(lengths: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment id and position of every column of packed rows.

    Args:
        lengths: (B, S) lengths of the prefix (column 0, may be 0) and of replies
            1..S-1 (0: an unused slot).
        width: L >= max row total.
    Returns:
        segment (B, L): PREFIX, the reply's number 1..S-1, or PAD after the row's end;
        positions (B, L): a reply's tokens count on from the end of its prefix (0 on
        padding).
    """
    ends = lengths.cumsum(dim=1)  # (B, S): one past the last column of each segment
    column = torch.arange(width, device=lengths.device).unsqueeze(0)  # (1, L)
    # The segment of a column is the number of segment ends at or before it; past the
    # last end it is S, i.e. padding.
    segment = (column.unsqueeze(2) >= ends.unsqueeze(1)).sum(dim=2)  # (B, L)
    starts = ends - lengths  # (B, S)
    prefix = lengths[:, :1]  # (B, 1)
    is_pad = segment >= lengths.shape[1]
    start = starts.gather(1, segment.clamp(max=lengths.shape[1] - 1))  # (B, L)
    position = torch.where(segment == PREFIX, column, prefix + column - start)
    return torch.where(is_pad, PAD, segment), torch.where(is_pad, 0, position)


def packed_attention_mask(segment: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) boolean mask (True: may attend) of packed rows.

    Causal, and a token sees the prefix and its own segment only; no real token sees
    padding. A padding query attends to itself only: a row with no key at all would
    make softmax NaN, and NaN times a zero gradient is still NaN.

    Args:
        segment: (B, L) segment ids from `packed_layout`.
    """
    width = segment.shape[1]
    column = torch.arange(width, device=segment.device)
    causal = column.unsqueeze(1) >= column.unsqueeze(0)  # (L, L): query i, key j <= i
    query, key = segment.unsqueeze(2), segment.unsqueeze(1)  # (B, L, 1), (B, 1, L)
    allowed = causal & (query != PAD) & (key != PAD) & ((key == PREFIX) | (key == query))
    allowed = allowed | torch.eye(width, dtype=torch.bool, device=segment.device)
    return allowed.unsqueeze(1)


def mask_for(config, mask: torch.Tensor) -> torch.Tensor:
    """The 4D mask in the form the model's attention takes: boolean for SDPA, additive
    (0 / dtype minimum) for eager attention, which adds it to the scores."""
    if getattr(config, "_attn_implementation", None) == "eager":
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask


def packed_hidden(decoder, config, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, L, H) last hidden states of packed rows.

    Args:
        decoder: the transformers backbone (``model.model`` of a causal LM or classifier).
        config: its config (for the attention implementation).
        ids: (B, L) packed rows, right-padded; lengths: (B, S) as in `packed_layout`.
    """
    segment, positions = packed_layout(lengths, ids.shape[1])
    mask = mask_for(config, packed_attention_mask(segment))
    return decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state


def segment_ends(lengths: torch.Tensor) -> torch.Tensor:
    """(B, S) column of the last token of each segment (meaningless for empty slots)."""
    return lengths.cumsum(dim=1) - 1


def pack_rows(rows: list[tuple[list[int], list[list[int]]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded packed rows from (prefix ids, [reply ids, ...]) tuples.

    Returns:
        ids (B, L), lengths (B, S) with S = 1 + the most replies of any row.
    """
    slots = 1 + max(len(replies) for _, replies in rows)
    lengths = torch.zeros(len(rows), slots, dtype=torch.long)
    flat = []
    for i, (prefix, replies) in enumerate(rows):
        lengths[i, 0] = len(prefix)
        for k, reply in enumerate(replies, start=1):
            if not reply:
                raise ValueError("a packed reply needs at least one token")
            lengths[i, k] = len(reply)
        flat.append([*prefix, *(t for reply in replies for t in reply)])
    ids = torch.full((len(rows), max(len(f) for f in flat)), pad_id, dtype=torch.long)
    for i, f in enumerate(flat):
        ids[i, : len(f)] = torch.tensor(f, dtype=torch.long)
    return ids, lengths


def common_prefix_length(sequences: list[list[int]]) -> int:
    """Length of the longest token prefix all ``sequences`` share."""
    shortest = min(len(s) for s in sequences)
    for i in range(shortest):
        token = sequences[0][i]
        if any(s[i] != token for s in sequences[1:]):
            return i
    return shortest


def group_into_rows(
    sequences: list[list[int]], keys: list, max_row_tokens: int
) -> list[tuple[list[int], list[int], list[list[int]]]]:
    """Pack token sequences that share a prefix: those with the same ``key`` (e.g. the
    prompt) are grouped, and each group is cut into rows of at most ``max_row_tokens``
    (a longer single sequence gets a row of its own).

    The shared prefix is the group's longest common TOKEN prefix, minus one token when
    it would leave a sequence with no token of its own, so packing never depends on
    where the text of a reply starts. A sequence that would shrink the row's prefix to
    nothing, or to less than half once it holds two members, waits for a later row, as
    do all the group's sequences once a row is full.

    Returns:
        (indices into ``sequences``, prefix ids, [rest of each sequence]) per row.
    """
    groups: dict = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    rows = []
    for members in groups.values():
        pending = members
        while pending:
            first = sequences[pending[0]]
            take, shared, deferred, full = [pending[0]], len(first) - 1, [], False
            for index in pending[1:]:
                # the row's prefix shrinks to what every member shares (and leaves each
                # at least one token of its own); its total counts the prefix once
                candidate = min(shared, common_prefix_length([first, sequences[index]]), len(sequences[index]) - 1)
                full = full or candidate + sum(len(sequences[i]) - candidate for i in (*take, index)) > max_row_tokens
                # a member that shares (almost) nothing with this row, e.g. a text
                # truncated on the left, would pay the dense mask for no saving
                if full or candidate == 0 or (len(take) > 1 and candidate < shared // 2):
                    deferred.append(index)
                    continue
                take.append(index)
                shared = candidate
            rows.append((take, first[:shared], [sequences[i][shared:] for i in take]))
            pending = deferred
    return rows


class PackedEpisodes:
    """Episodes (prompt + sampled response rows) packed so that a shared prompt, and
    any shared start of the responses, runs once.

    Built from the (B, P + T) rows of a rollout: prompts left-padded to P, responses
    right-padded to T with ``attention_mask`` 1 up to and including the stop token.
    `response_states` turns the packed rows' hidden states back into the (B, T, H)
    states that predict each response token, which is what the unpacked forward gives.

    Attributes:
        ids: (G, L) packed rows; lengths: (G, S) their segment lengths.
        index: (B, T) flat index into the (G * L) packed columns of the state before
            each response token (padding positions repeat the last real one).
    """

    def __init__(self, ids: torch.Tensor, lengths: torch.Tensor, index: torch.Tensor):
        self.ids, self.lengths, self.index = ids, lengths, index

    @classmethod
    def build(
        cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int, pad_id: int, max_row_tokens: int
    ) -> PackedEpisodes | None:
        """The packing of these episodes, or None when no two of them share a prompt
        (nothing to gain: the plain forward is cheaper than a dense packed mask)."""
        ids, mask = input_ids.tolist(), attention_mask.tolist()
        width = input_ids.shape[1] - prompt_length
        sequences, prompt_lengths, response_lengths, keys = [], [], [], []
        for row, row_mask in zip(ids, mask, strict=True):
            prompt = [t for t, m in zip(row[:prompt_length], row_mask[:prompt_length], strict=True) if m]
            # the completion mask is 1 up to the stop token: its sum is the real length
            length = sum(row_mask[prompt_length:])
            if not prompt or not length:
                raise ValueError("packed episodes need a prompt token and a response token in every row")
            sequences.append(prompt + row[prompt_length : prompt_length + length])
            prompt_lengths.append(len(prompt))
            response_lengths.append(length)
            keys.append(tuple(prompt))
        rows = group_into_rows(sequences, keys, max_row_tokens)
        if len(rows) == len(sequences):
            return None
        packed_ids, lengths = pack_rows([(head, rest) for _, head, rest in rows], pad_id)
        row_width = packed_ids.shape[1]
        index = torch.empty(len(sequences), width, dtype=torch.long)
        steps = torch.arange(width)
        for g, (members, head, rest) in enumerate(rows):
            start = len(head)  # column where this member's own tokens begin
            for member, own in zip(members, rest, strict=True):
                # token j of the member's full sequence predicts token j + 1: response
                # token t is predicted by j = prompt + t - 1; padding positions repeat
                # the state before the last real token
                last = prompt_lengths[member] + response_lengths[member] - 1
                j = (prompt_lengths[member] + steps - 1).clamp(max=last - 1)
                index[member] = g * row_width + torch.where(j < len(head), j, start + j - len(head))
                start += len(own)
        return cls(packed_ids.to(input_ids.device), lengths.to(input_ids.device), index.to(input_ids.device))

    def response_states(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, H) states before each response token, from the (G, L, H) packed hidden."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        return flat.index_select(0, self.index.reshape(-1)).reshape(*self.index.shape, hidden.shape[-1])


class EpisodePacker:
    """`PackedEpisodes.build` for one batch at a time, remembered: the policy, reference
    and value passes over the same (B, P + T) tensors share one layout instead of each
    building it again (a host copy of the ids and a Python pass over them).

    The tensors of the last call are held, so an identity match cannot be a new tensor
    that reuses a freed one's memory.
    """

    def __init__(self, pad_id: int, max_row_tokens: int = PACKED_ROW_TOKENS):
        self.pad_id, self.max_row_tokens = pad_id, max_row_tokens
        self._last: tuple | None = None

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int) -> PackedEpisodes | None:
        last = self._last
        if last is not None and last[0] is input_ids and last[1] is attention_mask and last[2] == prompt_length:
            return last[3]
        packed = PackedEpisodes.build(input_ids, attention_mask, prompt_length, self.pad_id, self.max_row_tokens)
        self._last = (input_ids, attention_mask, prompt_length, packed)
        return packed
