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
* `RewardScorer` — loads a saved reward-model folder (merged weights, tokenizer and
  ``reward_stats.json``) and returns the normalised reward and ``sigmoid`` of it.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ucai.chat import DEFAULT_SYSTEM_PROMPT, render_chat
from ucai.errors import UcaiError

STATS_FILE = "reward_stats.json"

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


def last_real_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of the mask, whatever side the padding is on.

    Args:
        attention_mask: (B, T) 0/1.
    Returns:
        (B,) long indices in [0, T).
    """
    mask = attention_mask.long()
    width = mask.shape[1]
    # argmax returns the FIRST maximum, so on the flipped mask it finds the last 1.
    return width - 1 - mask.flip(1).argmax(dim=1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counted from each row's first real token (0 on left padding)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


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
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state  # (B, T, H)
    index = last_real_token_index(attention_mask)  # (B,)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]  # (B, H)
    return inner.score(pooled)[:, 0]


def shared_prefix_rewards(
    model,
    prefix_ids: torch.Tensor,
    prefix_mask: torch.Tensor,
    continuation_ids: torch.Tensor,
    continuation_mask: torch.Tensor,
) -> torch.Tensor:
    """Rewards of B chosen and B rejected sequences that share a token prefix per pair.

    In preference data the two texts of a pair differ only in the final reply; the
    conversation before it (often most of the tokens in multi-turn hh-rlhf) is run once
    per pair, and its keys/values are reused, with gradients, by both replies. The
    result equals `sequence_rewards` on the full sequences: the same tokens see the
    same positions and attend to the same keys.

    Args:
        prefix_ids: (B, P) shared prefixes, LEFT-padded (all end at column P).
        prefix_mask: (B, P) 1 for real prefix tokens.
        continuation_ids: (2B, C) the rest of each sequence, right-padded; rows
            [0, B) continue pair i's prefix with the chosen reply, rows [B, 2B) with
            the rejected one.
        continuation_mask: (2B, C) 1 for real tokens; every row has at least one.
    Returns:
        (2B,) rewards: chosen rows first, then rejected.
    """
    from transformers import DynamicCache

    inner = unwrap_peft(model)
    backbone = getattr(inner, inner.base_model_prefix)
    cache = DynamicCache(config=inner.config)
    # transformers 5.24 renamed the keyword past_key_values -> cache; accept either.
    cache_kw = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
    backbone(
        input_ids=prefix_ids,
        attention_mask=prefix_mask,
        position_ids=position_ids_from_mask(prefix_mask),
        use_cache=True,
        **{cache_kw: cache},
    )
    for layer in cache.layers:  # (B, heads, P, d) -> (2B, heads, P, d), gradients flow to both
        layer.keys = torch.cat([layer.keys, layer.keys])
        layer.values = torch.cat([layer.values, layer.values])
    prefix_mask2 = torch.cat([prefix_mask, prefix_mask])  # (2B, P)
    full_mask = torch.cat([prefix_mask2, continuation_mask], dim=1)  # (2B, P + C)
    positions = position_ids_from_mask(full_mask)[:, prefix_mask.shape[1] :]  # (2B, C)
    hidden = backbone(
        input_ids=continuation_ids,
        attention_mask=full_mask,
        position_ids=positions,
        use_cache=True,
        **{cache_kw: cache},
    ).last_hidden_state  # (2B, C, H)
    index = last_real_token_index(continuation_mask)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]  # (2B, H)
    return inner.score(pooled)[:, 0]


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
    """

    mean: float = 0.0
    std: float = 1.0
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    max_length: int = 512
    pairs: int = 0

    def to_json(self) -> dict:
        return {
            "mean": self.mean,
            "std": self.std,
            "system_prompt": self.system_prompt,
            "max_length": self.max_length,
            "pairs": self.pairs,
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
        )


def normalise(rewards: torch.Tensor, stats: RewardStats) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised reward, sigmoid of it in [0, 1]); both shaped like ``rewards``."""
    normalised = (rewards.float() - stats.mean) / stats.std
    return normalised, torch.sigmoid(normalised)


def tokenize_for_reward(tokenizer, texts: list[str], max_length: int, padding_side: str = "right"):
    """Tokenise rendered texts, keeping the END of long ones (the response is there).

    Encoders always pad on the right: their head reads position 0 ([CLS]).
    """
    side, truncation_side = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = padding_side, "left"
    try:
        # Chat-template text already holds its special tokens; encoders need [CLS]/[SEP].
        return tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=max_length,
            add_special_tokens=not has_chat_template(tokenizer),
            return_tensors="pt",
        )
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, truncation_side


# --------------------------------------------------------------------------- scorer


class RewardScorer:
    """Score (prompt, response) pairs with a saved reward-model folder.

    Args:
        folder_or_name: a folder written by the reward stage (merged sequence
            classifier, tokenizer, ``reward_stats.json``).
        device: where to run.
        dtype: weight dtype (bf16 halves memory; rewards come back as float32).
        batch_size: texts per forward.
    """

    def __init__(
        self,
        folder_or_name: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
    ):
        from ucai.models import load_sequence_classifier, load_tokenizer

        folder = Path(folder_or_name).expanduser()
        if not folder.is_dir():
            raise UcaiError(
                f"reward model folder {folder} not found; it is made by the reward stage "
                "(ucai fit --config configs/reward_<side>.yaml)"
            )
        self.stats = RewardStats.read(folder)
        self.tokenizer = load_tokenizer(str(folder), padding_side="right")
        self.model = load_sequence_classifier(str(folder), dtype=dtype).to(device).eval()
        self.batch_size = batch_size

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
        device = next(self.model.parameters()).device  # follows the model if moved later
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = tokenize_for_reward(self.tokenizer, texts[start : start + self.batch_size], self.stats.max_length)
            batch = batch.to(device)
            out.append(sequence_rewards(self.model, batch["input_ids"], batch["attention_mask"]).float().cpu())
        return torch.cat(out) if out else torch.empty(0)

    def score(self, prompts, responses) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised reward (N,), score in [0, 1] (N,)), both float32 on CPU."""
        return normalise(self.raw_rewards(prompts, responses), self.stats)
