"""How faithful a generation engine is to the model it runs.

An engine is *faithful* when the log-prob it assigns each token it generated equals
the model's own forward log-prob of that token (the full sequence run once, as PPO's
training forward runs it: the decoder, then the head at the completion's positions)
about as closely as transformers ``generate`` does: both decode step by step from a
KV cache, with kernels that round differently from the forward's. `measure_engines`
returns the mean and max |Δ log-prob| over the generated tokens; the fast engine's test
(`tests/test_generation_fidelity.py`) and ``benchmarks/generation.py`` hold it to:
mean no larger than ``generate``'s own, max at most twice ``generate``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ucai.generation_engine import GenerationEngine
from ucai.models import logits_are_head_of_hidden, output_head
from ucai.next_token import StepRecorder
from ucai.padding import completion_mask_from, position_ids


@dataclass(frozen=True)
class Fidelity:
    """|engine log-prob − forward log-prob| over the generated tokens (eos included)."""

    mean_abs: float
    max_abs: float
    tokens: int
    sequences: torch.Tensor  # (B, P + T) what the engine generated

    def line(self, name: str) -> str:
        return f"{name}: mean |Δ logprob| {self.mean_abs:.2e}, max {self.max_abs:.2e} over {self.tokens} tokens"


@torch.no_grad()
def forward_logprobs(model, sequences: torch.Tensor, prompt_mask: torch.Tensor, rows_per_pass: int = 4) -> torch.Tensor:
    """The model's forward log-prob of every token after the prompt, computed as PPO's
    training forward computes it (`ucai.stages.ppo.PPOModule.response_hidden`): the
    decoder over the whole sequence, then the output head at the T positions that
    predict a completion token only. Models whose logits are not the head of the last
    hidden state (`ucai.models.logits_are_head_of_hidden`) run their own forward.

    Args:
        sequences: (B, P + T) left-padded prompts followed by their completions.
        prompt_mask: (B, P) 1 on prompt tokens.
    Returns:
        (B, T) float32 log-probs (positions after a row's eos hold whatever the pad
        token scores; callers mask them).
    """
    prompt_length = prompt_mask.shape[1]
    mask = torch.cat([prompt_mask, torch.ones_like(sequences[:, prompt_length:])], dim=1)
    head_of_hidden = logits_are_head_of_hidden(model)
    out = []
    for start in range(0, sequences.shape[0], rows_per_pass):  # (rows, T, V) float32 is large
        rows = slice(start, start + rows_per_pass)
        inputs = dict(input_ids=sequences[rows], attention_mask=mask[rows], position_ids=position_ids(mask[rows]))
        if head_of_hidden:
            hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state
            # (rows, T, H), contiguous as PPO's: position t predicts token t + 1
            logits = output_head(model)(hidden[:, prompt_length - 1 : -1].contiguous())
        else:
            logits = model(**inputs).logits[:, prompt_length - 1 : -1]  # (rows, T, V)
        logprobs = F.log_softmax(logits.float(), dim=-1)
        out.append(logprobs.gather(2, sequences[rows, prompt_length:, None]).squeeze(2))
    return torch.cat(out)


@torch.no_grad()
def measure_engines(
    engines: list[GenerationEngine],
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    settings,
    stop_ids: list[int],
    pad_id: int,
) -> list[Fidelity]:
    """Generate with each engine and compare each generated token's log-prob under the
    engine (its raw logits at that step) with the model's forward; one `Fidelity` per
    engine. The forward of sequences an earlier engine already generated (greedy
    decoding usually gives the same tokens) is reused, not run again: the same input
    through the same kernels gives the same log-probs, and that forward costs as much
    as a generation (16 x 128 tokens of a 49k vocabulary in bf16 without native bf16:
    about 5 s).

    Args:
        input_ids, attention_mask: (B, P) left-padded prompts.
    """
    forwards: list[tuple[torch.Tensor, torch.Tensor]] = []  # (sequences, their forward log-probs)
    results = []
    for engine in engines:
        recorder = StepRecorder()
        sequences = engine.generate(
            model, input_ids, attention_mask, settings, stop_ids, pad_id, observer=recorder
        )
        engine_logprobs = recorder.raw_logprobs()  # (B, T)
        completions = sequences[:, input_ids.shape[1] :]
        real, _ = completion_mask_from(completions, stop_ids) if stop_ids else (torch.ones_like(completions), None)
        reference = next((logprobs for seen, logprobs in forwards if torch.equal(seen, sequences)), None)
        if reference is None:
            reference = forward_logprobs(model, sequences, attention_mask)
            forwards.append((sequences, reference))
        differences = (engine_logprobs - reference).abs()[real.bool()]
        results.append(Fidelity(float(differences.mean()), float(differences.max()), int(differences.numel()), sequences))
    return results
