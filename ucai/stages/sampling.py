"""Checks that PPO samples from the distribution it computes log-probs on.

PPO's ratios and KL assume each response token was drawn from
``softmax(logits / temperature)``, the distribution `ucai.stages.ppo.PPOModule`
recomputes. Anything else that reshapes the sampling distribution inside ``generate``
makes the ratio of the first pass differ from 1 and biases the KL; these checks refuse
it before any training.
"""

from __future__ import annotations

from ucai.errors import UcaiError
from ucai.stages.generation import GenerationSettings

# Options of a model's own generation config that `generate` leaves in force and that
# reshape the distribution tokens are sampled from (transformers' logits processors).
DISTRIBUTION_CHANGING_GENERATION_FIELDS = (
    "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h", "no_repeat_ngram_size", "bad_words_ids",
    "min_length", "min_new_tokens", "sequence_bias", "suppress_tokens", "begin_suppress_tokens",
    "forced_bos_token_id", "forced_eos_token_id", "exponential_decay_length_penalty", "guidance_scale",
    "watermarking_config", "num_beams",
)


def check_plain_sampling(settings: GenerationSettings) -> None:
    """Refuse sampling settings under which PPO's log-probs are not those of the sampler.

    Nucleus and top-k truncation and the repetition penalty reshape the distribution
    inside ``generate`` (top-k 0, top-p 1 and penalty 1 are off).
    """
    if settings.do_sample and not settings.temperature > 0:
        raise UcaiError(f"ppo: generation.temperature must be > 0 when sampling, got {settings.temperature}")
    changes = []
    if settings.do_sample and settings.top_p is not None and settings.top_p < 1.0:
        changes.append(("top_p", settings.top_p, "1.0"))
    if settings.do_sample and settings.top_k not in (None, 0):
        changes.append(("top_k", settings.top_k, "0"))
    if settings.repetition_penalty not in (None, 1.0):
        changes.append(("repetition_penalty", settings.repetition_penalty, "1.0"))
    if changes:
        found = ", ".join(f"generation.{name} is {value}" for name, value, _ in changes)
        wanted = ", ".join(f"generation.{name}: {neutral}" for name, _, neutral in changes)
        raise UcaiError(f"ppo: {found}, but PPO's log-probs assume plain temperature sampling; set {wanted}")


def check_model_sampling(generation_config, policy: str) -> None:
    """Refuse a policy whose saved generation config reshapes the sampling distribution
    (``min_p``, ``no_repeat_ngram_size``, ``min_new_tokens``, ...): `GenerationSettings`
    overrides temperature, top-p, top-k and the repetition penalty, but these would
    still apply inside ``generate``, away from PPO's log-probs."""
    from transformers import GenerationConfig

    default = GenerationConfig()
    changed = [
        f"{name}={getattr(generation_config, name)!r}"
        for name in DISTRIBUTION_CHANGING_GENERATION_FIELDS
        if getattr(generation_config, name, None) != getattr(default, name, None)
    ]
    if changed:
        raise UcaiError(
            f"ppo: {policy}/generation_config.json sets {', '.join(changed)}, which changes the sampling "
            "distribution PPO's log-probs assume; remove it from that file"
        )
