"""PPO learns: the tiny model, a synthetic reward for emitting one token, a few dozen
seconds on CPU. The mean score must rise clearly while the KL to the reference stays
bounded.

Why these settings: the random tiny model spreads its probability over 49k tokens, and
with tied embeddings its attention/MLP adapters can barely move any logit. LoRA on
``lm_head`` gives the policy a direct path to the logit of the rewarded token, and
temperature 0.1 gives that token ("\\n", which the model copies from the end of the
chat template) a starting share of about 0.3, so there is signal from the first batch.
"""

from __future__ import annotations

import dataclasses
import statistics

import lightning as L
import torch

from ucai.data.prompt_datamodule import PromptDataModule
from ucai.stages.generation import GenerationSettings


class _Record(L.Callback):
    def __init__(self):
        self.scores: list[float] = []
        self.kls: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.scores.append(module.last_stats["objective/raw_scores"])
        self.kls.append(module.last_stats["objective/kl"])


def test_score_rises_with_bounded_kl(tmp_path, tiny_ppo, tiny_lora, tiny_trainer):
    torch.manual_seed(0)
    module = tiny_ppo(  # rewarded for newlines
        lora=dataclasses.replace(tiny_lora, r=8, alpha=16, target_modules=["q_proj", "v_proj", "lm_head"]),
        ppo_epochs=2,
        minibatch_size=8,
        learning_rate=3e-3,
        lr_schedule="constant",
        kl_coef=0.05,
        missing_eos_penalty=0.0,  # the tiny model never says eos; the penalty would be a constant
        generation=GenerationSettings(max_new_tokens=4, temperature=0.1, top_p=1.0),
    )
    record = _Record()
    iterations = 12
    # 2 epochs x 1 minibatch per rollout batch
    trainer = tiny_trainer(tmp_path, iterations * 2, logger=False, callbacks=[record])
    trainer.fit(module, datamodule=PromptDataModule(limit=96, batch_size=8, split="train"))
    assert len(record.scores) == iterations
    start, end = statistics.mean(record.scores[:3]), statistics.mean(record.scores[-3:])
    assert start < 0.5, record.scores
    assert end > 0.8 and end - start > 0.3, record.scores
    # Bounded drift: a few nats per 4-token response, never a blow-up.
    assert max(record.kls) < 10.0, record.kls
