"""Reward-model scoring shared by the reward stage, PPO and evaluation.

A reward model is a sequence classifier with one scalar output. Two things must be
identical wherever it is used, or the numbers mean something different in training and
in PPO: how a (conversation, response) pair becomes text, and which token's hidden
state is scored. Both live here.

* `render_for_reward` — the conversation plus the response, through the reward
  model's own chat template (plain hh-rlhf transcript text for encoders without one).
* `sequence_rewards` — decoder backbones (Llama, SmolLM2, ...) are scored at the LAST
  REAL token, found from the attention mask (not from ``pad_token_id``, which can also
  occur inside text), with position ids counted from the first real token, so left
  and right padding give the same score. Encoders (BERT) are called as they are: their
  head pools the first ([CLS]) token, which needs right padding.
* `packed_pair_rewards` — training on preference pairs: one row per pair, the shared
  conversation once and both replies after it, with a 4D mask and positions that
  give each reply exactly what it would see in its own sequence (`ucai.packing`).
  `RewardScorer` packs the same way every group of texts that share a beginning
  (answers to one prompt), `packed_rewards`.
* `RewardScorer` — loads a saved reward-model folder (merged weights, tokenizer and
  ``reward_stats.json``) and returns the normalised reward and ``sigmoid`` of it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ucai.chat import DEFAULT_SYSTEM_PROMPT, render_chat
from ucai.errors import UcaiError
from ucai.packing import attention_takes_4d_mask, group_into_rows, pack_rows, packed_hidden, segment_ends
from ucai.padding import last_real_index, position_ids, tokenizer_sides
from ucai.stage_outputs import made_by

STATS_FILE = "reward_stats.json"
# Longest packed row of `RewardScorer` (tokens): long enough for a conversation and
# several replies to it, short enough that the dense attention over the row stays a
# small part of the work.
PACK_TOKENS = 512

Message = dict[str, str]


# --------------------------------------------------------------------------- rendering


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_for_reward(
    tokenizer,
    conversation: str | Sequence[Message],
    response: str,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
) -> str:
    """The text a reward model scores: the conversation followed by the final reply.

    ``conversation`` is a user prompt or a list of chat messages ending with a user
    turn. Chat-template text is right-stripped so that the last token is the end-of-turn
    token (``<|im_end|>``), not a newline the template happens to add after it.
    Encoders get the transcript format without a system line (it would only cost
    tokens of their short context).
    """
    messages = [{"role": "user", "content": conversation}] if isinstance(conversation, str) else list(conversation)
    messages = messages + [{"role": "assistant", "content": response}]
    if has_chat_template(tokenizer):
        return render_chat(tokenizer, messages, system_prompt, add_generation_prompt=False).rstrip()
    return render_chat(tokenizer, messages, None, add_generation_prompt=False).strip()


# --------------------------------------------------------------------------- pooling


def unwrap_peft(model):
    """The transformers model inside a peft wrapper (LoRA layers stay injected)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def pools_last_token(model) -> bool:
    """Whether the model is a decoder-style classifier (a ``score`` head on every token).

    Transformers' ``*ForSequenceClassification`` decoders (Llama, Mistral, Qwen, GPT-2)
    name the head ``score``; encoders (BERT: ``classifier`` on the pooled [CLS]) do not.
    """
    inner = unwrap_peft(model)
    return hasattr(inner, "score") and hasattr(inner, getattr(inner, "base_model_prefix", "") or "\0")


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One scalar reward per sequence.

    Decoders: the backbone runs with position ids from the mask, the hidden state of
    the last real token goes through the ``score`` head (only B rows, not B·T). Under
    peft the call goes through the wrapped head, so its trained copy is used.

    Args:
        input_ids: (B, T) token ids, padded on either side.
        attention_mask: (B, T) 1 for real tokens.
    Returns:
        (B,) rewards in the head's dtype.
    """
    if not pools_last_token(model):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
    inner = unwrap_peft(model)
    backbone = getattr(inner, inner.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
    ).last_hidden_state  # (B, T, H)
    index = last_real_index(attention_mask)  # (B,)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]  # (B, H)
    return inner.score(pooled)[:, 0]


# The segments of a packed pair row (`ucai.packing`): the shared conversation, then
# the rest of the chosen text, then the rest of the rejected text.
CHOSEN, REJECTED = 1, 2


def packs_pairs(model) -> bool:
    """Whether packed rows (`packed_pair_rewards`, `packed_rewards`) can run on this
    model: a decoder with an attention implementation that takes a custom 4D mask."""
    return pools_last_token(model) and attention_takes_4d_mask(unwrap_peft(model).config)


def packed_rewards(model, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Rewards of the replies of packed rows, each row one prefix followed by its
    replies (`ucai.packing`): each reply is scored at its last token, which sees
    exactly what it sees in its own full sequence, so the rewards equal
    `sequence_rewards` on the full texts up to float rounding.

    Args:
        ids: (B, L) packed rows, right-padded.
        lengths: (B, S) lengths of the prefix and of S - 1 replies (0: unused slot).
    Returns:
        (B, S - 1) rewards; entries of unused slots are meaningless.
    """
    inner = unwrap_peft(model)
    backbone = getattr(inner, inner.base_model_prefix)
    hidden = packed_hidden(backbone, inner.config, ids, lengths)  # (B, L, H)
    ends = segment_ends(lengths)[:, 1:].clamp(min=0)  # (B, S - 1)
    pooled = hidden.gather(1, ends.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # (B, S - 1, H)
    return inner.score(pooled)[..., 0]


def packed_pair_rewards(model, pair_ids: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Rewards of B preference pairs, each packed into ONE row with its prefix once.

    The two texts of a pair differ only in the final reply; the conversation before it
    (most of the tokens in multi-turn hh-rlhf) is run once, and each reply attends to
    it and to itself only, at the positions of its own sequence (`packed_rewards`),
    while a row holds P + Cc + Cr tokens instead of 2 x (P + C).

    Args:
        pair_ids: (B, L) packed rows, right-padded.
        segments: (B, 3) lengths (prefix P, chosen rest Cc >= 1, rejected rest Cr >= 1).
    Returns:
        (2B,) rewards: chosen rows first, then rejected.
    """
    rewards = packed_rewards(model, pair_ids, segments)  # (B, 2)
    return torch.cat([rewards[:, 0], rewards[:, 1]])


# --------------------------------------------------------------------------- stats


@dataclass(frozen=True)
class RewardStats:
    """What a saved reward model needs beside its weights to score like in training.

    Attributes:
        mean, std: reward mean and standard deviation over the training set; scores
            are reported as ``(r - mean) / std`` so that 0 is an average response.
        system_prompt: system message the training texts were rendered with.
        max_length: tokens per text in training (longer texts keep their end).
        pairs: how many training pairs the stats were computed over.
        heldout_accuracy, heldout_pairs: pairwise accuracy of the saved model on its
            own held-out (validation) pairs, and how many there were (None/0: none).
        cross_accuracy, cross_pairs: its accuracy on the OTHER constitution's
            preference pairs, judged by that side's labels. Below 0.5 means the two
            reward models disagree, as a constitution and its inverse should; near
            the held-out accuracy means the model learned something both sides share
            (length, fluency) rather than its principle. None/0: not measured.
    """

    mean: float = 0.0
    std: float = 1.0
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    max_length: int = 512
    pairs: int = 0
    heldout_accuracy: float | None = None
    heldout_pairs: int = 0
    cross_accuracy: float | None = None
    cross_pairs: int = 0

    def to_json(self) -> dict:
        return {
            "mean": self.mean,
            "std": self.std,
            "system_prompt": self.system_prompt,
            "max_length": self.max_length,
            "pairs": self.pairs,
            "heldout_accuracy": self.heldout_accuracy,
            "heldout_pairs": self.heldout_pairs,
            "cross_accuracy": self.cross_accuracy,
            "cross_pairs": self.cross_pairs,
        }

    @classmethod
    def read(cls, folder: str | Path) -> RewardStats:
        path = Path(folder) / STATS_FILE
        if not path.is_file():
            raise UcaiError(
                f"{path}: file not found; a reward-model folder is made by the reward stage "
                "(ucai fit --config configs/reward_<side>.yaml)"
            )
        try:
            data = json.loads(path.read_text())
            mean, std = float(data["mean"]), float(data["std"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UcaiError(f"{path}: expected a JSON object with numbers 'mean' and 'std' ({exc})") from None
        if not (math.isfinite(mean) and math.isfinite(std)) or std <= 0:
            raise UcaiError(f"{path}: 'mean' must be finite and 'std' positive, got {mean}, {std}")
        return cls(
            mean=mean,
            std=std,
            system_prompt=data.get("system_prompt", DEFAULT_SYSTEM_PROMPT),
            max_length=int(data.get("max_length", 512)),
            pairs=int(data.get("pairs", 0)),
            heldout_accuracy=_optional_float(data.get("heldout_accuracy")),
            heldout_pairs=int(data.get("heldout_pairs") or 0),
            cross_accuracy=_optional_float(data.get("cross_accuracy")),
            cross_pairs=int(data.get("cross_pairs") or 0),
        )


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


def normalise(rewards: torch.Tensor, stats: RewardStats) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised reward, sigmoid of it in [0, 1]); both shaped like ``rewards``."""
    normalised = (rewards.float() - stats.mean) / stats.std
    return normalised, torch.sigmoid(normalised)


def tokenize_for_reward(tokenizer, texts: list[str], max_length: int | None, padding_side: str = "right"):
    """Tokenise rendered texts, keeping the END of long ones (the response is there);
    ``max_length`` None does not truncate.

    Encoders always pad on the right: their head reads position 0 ([CLS]).
    """
    with tokenizer_sides(tokenizer, padding_side, "left"):
        # Chat-template text already holds its special tokens; encoders need [CLS]/[SEP].
        return tokenizer(
            texts,
            padding=True,
            truncation=max_length is not None,
            max_length=max_length,
            add_special_tokens=not has_chat_template(tokenizer),
            return_tensors="pt",
        )


def tokenize_for_reward_lists(tokenizer, texts: list[str], max_length: int | None) -> list[list[int]]:
    """Unpadded token ids of each text, truncated like `tokenize_for_reward` (None: not at all)."""
    out = []
    for start in range(0, len(texts), 256):
        batch = tokenize_for_reward(tokenizer, texts[start : start + 256], max_length)
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            out.append(ids[mask.bool()].tolist())
    return out


# --------------------------------------------------------------------------- scorer


class RewardScorer:
    """Score (prompt, response) pairs with a saved reward-model folder.

    Args:
        folder_or_name: a folder written by the reward stage (merged sequence
            classifier, tokenizer, ``reward_stats.json``).
        device: where to run.
        dtype: weight dtype (bf16 halves memory; rewards come back as float32).
        batch_size: texts per forward.
        pack_tokens: longest packed row (tokens) when texts that share a beginning
            are packed (`packed_rewards`); None scores every text in its own row.
    """

    def __init__(
        self,
        folder_or_name: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        pack_tokens: int | None = PACK_TOKENS,
    ):
        from ucai.models import load_sequence_classifier, load_tokenizer

        folder = Path(folder_or_name).expanduser()
        if not folder.is_dir():
            raise UcaiError(f"reward model folder {folder} not found; {made_by(folder, 'reward')}")
        self.stats = RewardStats.read(folder)
        self.tokenizer = load_tokenizer(str(folder), padding_side="right")
        self.model = load_sequence_classifier(str(folder), dtype=dtype).to(device).eval()
        self.batch_size = batch_size
        self.pack_tokens = pack_tokens

    def render(self, prompts: Sequence[str | Sequence[Message]], responses: Sequence[str]) -> list[str]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return [
            render_for_reward(self.tokenizer, p, r, self.stats.system_prompt) for p, r in zip(prompts, responses, strict=True)
        ]

    @torch.no_grad()
    def raw_rewards(self, prompts, responses) -> torch.Tensor:
        """(N,) float32 rewards before normalisation."""
        texts = self.render(prompts, responses)
        sequences = tokenize_for_reward_lists(self.tokenizer, texts, self.stats.max_length)
        if self.pack_tokens and len(texts) > 1 and packs_pairs(self.model):
            rows = group_into_rows(sequences, [repr(p) for p in prompts], self.pack_tokens)
            if len(rows) < len(texts):  # something is shared: else plain rows are cheaper
                return self._packed_rewards(rows, len(texts))
        return self._plain_rewards(sequences)

    def _plain_rewards(self, sequences: list[list[int]]) -> torch.Tensor:
        """(N,) rewards, each token sequence in a row of its own."""
        device = next(self.model.parameters()).device  # follows the model if moved later
        # Batches of like length: a batch pads to its longest text, and answers of
        # different models vary several-fold in length. Each text's reward does not
        # depend on its batch (right padding, positions from the mask) beyond matmul
        # rounding; the order is restored.
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        out = torch.empty(len(sequences))
        for start in range(0, len(sequences), self.batch_size):
            picked = order[start : start + self.batch_size]
            with tokenizer_sides(self.tokenizer, "right", "left"):  # encoders read position 0
                batch = self.tokenizer.pad({"input_ids": [sequences[i] for i in picked]}, return_tensors="pt")
            batch = batch.to(device)
            out[picked] = sequence_rewards(self.model, batch["input_ids"], batch["attention_mask"]).float().cpu()
        return out

    def _packed_rewards(self, rows: list[tuple[list[int], list[int], list[list[int]]]], count: int) -> torch.Tensor:
        """(N,) rewards of texts grouped into packed rows (`ucai.packing.group_into_rows`)
        that run their shared beginning once; batches of like-length rows holding about
        ``batch_size`` texts each."""
        device = next(self.model.parameters()).device
        rows = sorted(rows, key=lambda row: len(row[1]) + sum(map(len, row[2])))
        out = torch.empty(count)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        start = 0
        while start < len(rows):
            batch, texts = [], 0
            while start < len(rows) and (not batch or texts + len(rows[start][0]) <= self.batch_size):
                batch.append(rows[start])
                texts += len(rows[start][0])
                start += 1
            ids, lengths = pack_rows([(head, rest) for _, head, rest in batch], pad)
            rewards = packed_rewards(self.model, ids.to(device), lengths.to(device)).float().cpu()  # (R, S - 1)
            for r, (members, _, _) in enumerate(batch):
                out[members] = rewards[r, : len(members)]
        return out

    def score(self, prompts, responses) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised reward (N,), score in [0, 1] (N,)), both float32 on CPU."""
        return normalise(self.raw_rewards(prompts, responses), self.stats)


# --------------------------------------------------------------------------- synthetic reward

TOKEN_REWARD_PREFIX = "token:"


class TokenReward:
    """Synthetic reward for tests and diagnostics: the share of response tokens that are
    one chosen token. ``reward_model: token:<id or token text>`` selects it.

    It measures nothing about ethics; it exists so that learning can be checked in
    seconds with a tiny model, and so that the RL loop can be debugged without a
    reward model.
    """

    def __init__(self, spec: str, tokenizer):
        value = spec.removeprefix(TOKEN_REWARD_PREFIX)
        if value.strip().isdigit():
            self.token_id = int(value)
        else:
            ids = tokenizer(value, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise UcaiError(
                    f"reward_model {spec!r}: {value!r} is {len(ids)} tokens for this tokenizer; "
                    "give one token or its id"
                )
            self.token_id = ids[0]
        if not 0 <= self.token_id < len(tokenizer):
            raise UcaiError(f"reward_model {spec!r}: token id {self.token_id} is outside the vocabulary")

    def __call__(self, responses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,) share of real tokens (eos included) equal to the chosen token.

        Args:
            responses: (B, T) response ids.
            mask: (B, T) 0/1 real response tokens.
        """
        hits = (responses == self.token_id).float() * mask
        return hits.sum(1) / mask.sum(1).clamp(min=1)
