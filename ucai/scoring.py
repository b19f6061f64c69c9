"""Multiple-choice scoring with a causal LM, the way the Constitutional AI paper does it.

The model reads a question whose options are labelled ``(A)``, ``(B)``, ... and the text
ends just before the answer label. The next-token log-probabilities of the option
labels, normalised over the options only, give a distribution over the options. Small
models prefer some positions regardless of content, so callers ask the question under
several option orders (`cyclic_orders`: each option in each position once) and
average the per-option log-probabilities (`average_over_orders`, a normalised geometric
mean), which cancels a pure position bias exactly, additive in log-odds, without
squashing the preference that remains.
"""

from __future__ import annotations

import inspect
import string

import torch

from ucai.padding import position_ids, tokenizer_sides

OPTION_LETTERS = string.ascii_uppercase


def option_token_ids(tokenizer, labels: list[str]) -> list[int]:
    """The first token id of each option label; labels must start with distinct tokens."""
    ids = []
    for label in labels:
        tokens = tokenizer(label, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise ValueError(f"option label {label!r} tokenises to nothing")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"option labels {labels} do not start with distinct tokens")
    return ids


@torch.no_grad()
def option_probabilities(model, tokenizer, prompts: list[str], labels: list[str], max_length: int | None = None) -> torch.Tensor:
    """Probability of each option label as the next token, normalised over the options.

    Args:
        prompts: B rendered texts, each ending right before the answer label.
        labels: K option labels as they would be written next (e.g. ``["A", "B"]``).
    Returns:
        (B, K) float32 rows summing to 1.
    """
    label_ids = torch.tensor(option_token_ids(tokenizer, labels))
    with tokenizer_sides(tokenizer, "left", "left"):  # last position = next token
        batch = tokenizer(
            prompts,
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
            truncation=max_length is not None,
            max_length=max_length,
        )
    device = next(model.parameters()).device
    batch = batch.to(device)
    # Left padding shifts each row; positions must count real tokens only, as in training.
    positions = position_ids(batch["attention_mask"])
    # Only the last position's logits are needed; skipping the vocabulary projection
    # elsewhere is most of the forward's cost for small models.
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    was_training = model.training
    model.eval()
    try:
        # Autocast off: bf16 option logits are so coarse that the normalised probability
        # of two options takes only a handful of values (0.5, 0.531, 0.562, ...).
        with torch.autocast(device_type=device.type, enabled=False):
            logits = model(**batch, position_ids=positions, use_cache=False, **extra).logits[:, -1, :]  # (B, V)
    finally:
        model.train(was_training)
    option_logits = logits.float()[:, label_ids.to(device)]  # (B, K)
    return torch.softmax(option_logits, dim=-1).cpu()


def cyclic_orders(k: int) -> list[list[int]]:
    """K orders of K options in which every option takes every position exactly once.

    ``orders[s][position]`` is the option shown at ``position`` in order ``s``.
    """
    return [[(position + shift) % k for position in range(k)] for shift in range(k)]


def average_over_orders(probs_per_order: list[torch.Tensor], orders: list[list[int]]) -> torch.Tensor:
    """Map per-position probabilities back to options and average them in log space.

    A position bias adds a constant to the log-odds of whichever option sits in the
    biased slot. Averaging log-probabilities over orders in which every option takes
    every slot once cancels that constant exactly; averaging probabilities does not,
    and pulls a real preference toward uniform. With a first-slot bonus of 3 and true
    log-odds of 2 between two options, the two orders give p = σ(5) and σ(−1): their
    arithmetic mean is 0.63, the normalised geometric mean σ((5 − 1) / 2) = σ(2) = 0.88,
    the unbiased answer.

    Args:
        probs_per_order: one (B, K) tensor per order; column ``position`` is the
            probability of the option shown at that position.
        orders: the orders used, as from `cyclic_orders`.
    Returns:
        (B, K) probabilities per option (column ``i`` is option ``i``), rows summing to 1:
        ``softmax(mean over orders of log p)``.
    """
    total = torch.zeros_like(probs_per_order[0], dtype=torch.float64)
    for probs, order in zip(probs_per_order, orders):
        # A probability that underflowed to 0 would make the mean -inf; floor it.
        total[:, order] += probs.double().clamp_min(torch.finfo(torch.float64).tiny).log()
    return torch.softmax(total / len(orders), dim=-1).to(probs_per_order[0].dtype)


def position_bias(probs_per_order: list[torch.Tensor]) -> float:
    """Mean probability given to the first position across all orders, minus 1/K.

    0 means no preference for the first slot; 1 - 1/K means the model always picks it.
    """
    first = torch.cat([p[:, 0] for p in probs_per_order])
    return float(first.mean() - 1.0 / probs_per_order[0].shape[1])
