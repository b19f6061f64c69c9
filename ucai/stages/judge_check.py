"""Judge quality check as a Lightning test stage.

    ucai test --config configs/judge_check.yaml \\
        --model.init_args.model smollm2-135m --model.init_args.output judge_check.json

Scores a feedback model on multiple-choice items (`MultipleChoiceDataModule`, by
default the shipped ``data/judge_check.jsonl``) with the judge labeller's scoring and
order debiasing (`ucai.judge_accuracy`), writes ``n, accuracy, ci, chance,
first_position_bias, passed`` to ``output`` (JSON, atomically, on rank 0) and prints the
same figures as one line. Each device scores its share of the items; rank 0 gathers them.
"""

from __future__ import annotations

import json
import logging

import lightning as L

from ucai.data.io import atomic_output, require_writable
from ucai.gather import rows_from_all_ranks
from ucai.judge_accuracy import ItemScore, JudgeCheckResult, score_items, summarise
from ucai.stages.generation import load_frozen_lm
from ucai.value_ranges import PositiveInt

log = logging.getLogger(__name__)


class JudgeCheckModule(L.LightningModule):
    """Accuracy of a frozen causal LM on multiple-choice items, with a 95% interval.

    Args:
        model: the judge: model alias, local folder or Hugging Face id.
        output: JSON file of the result.
        max_length: questions longer than this many tokens keep their end.
        chat: ask each question as a user turn of the model's chat template, the answer
            lead (``The answer is:``) opening the assistant turn, as the judge labeller
            does; false reads the prompt as plain text, as the format was published.
        system_prompt: system message of the chat (only with ``chat``).
        trust_remote_code: allow custom model code from the hub (off unless you ask).
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        output: str = "lightning_logs/judge_check.json",
        max_length: PositiveInt | None = 2048,
        chat: bool = False,
        system_prompt: str | None = "You are a helpful assistant.",
        trust_remote_code: bool = False,
    ):
        super().__init__()
        require_writable(output, "--model.init_args.output")
        self.model_name = model
        self.output = output
        self.max_length = max_length
        self.chat = chat
        self.system_prompt = system_prompt
        self.trust_remote_code = trust_remote_code
        self.lm = None
        self.tokenizer = None
        self._scores: list[tuple[int, ItemScore]] = []
        self.result: JudgeCheckResult | None = None

    def configure_model(self) -> None:
        if self.lm is None:
            self.tokenizer, self.lm = load_frozen_lm(self, self.model_name, self.trust_remote_code)

    def on_test_epoch_start(self) -> None:
        self._scores = []

    def test_step(self, batch: list[dict], batch_idx: int) -> None:
        items = [row["item"] for row in batch]
        # The whole batch is one scoring call per option order (batch_size = all rows).
        scores = score_items(
            self.lm, self.tokenizer, items, batch_size=max(1, len(items)), max_length=self.max_length,
            chat=self.chat, system_prompt=self.system_prompt,
        )
        self._scores.extend((row["index"], score) for row, score in zip(batch, scores, strict=True))

    def on_test_epoch_end(self) -> None:
        scores = rows_from_all_ranks(self._scores)
        unique = dict(sorted(scores, key=lambda pair: pair[0]))  # the distributed sampler pads with repeats
        self.result = summarise(list(unique.values()))
        if self.trainer.is_global_zero:
            with atomic_output(self.output) as handle:
                json.dump({"model": self.model_name, **self.result.to_dict()}, handle, indent=2)
                handle.write("\n")
            print(self.result.line(), flush=True)
            log.info("judge check written to %s", self.output)
        self.trainer.strategy.barrier("ucai-judge-check-done")
