"""Answer prompts with a model: the simplest generating stage.

    ucai predict --config configs/answer.yaml

Reads a prompt file through `PromptDataModule`, renders each prompt as a one-turn chat,
generates in batches and writes ``id, prompt, principle, response, model`` rows to
``output`` (JSONL + CSV), resumably and sharded across devices like every predict stage.
"""

from __future__ import annotations

from ucai.chat import render_chat
from ucai.stages.generation import GeneratingModule


class AnswerModule(GeneratingModule):
    """Generate one answer per prompt (see `GeneratingModule` for the arguments)."""

    csv_columns = ["id", "prompt", "principle", "response", "model"]

    def predict_step(self, batch: list[dict], batch_idx: int) -> list[dict]:
        prompts = [
            render_chat(self.tokenizer, [{"role": "user", "content": row["prompt"]}], self.system_prompt)
            for row in batch
        ]
        result = self.generate(prompts, keys=[str(row["id"]) for row in batch])
        self.count_prompts(len(batch))
        return [
            {
                "id": row["id"],
                "prompt": row["prompt"],
                "principle": row.get("principle"),
                "response": text,
                "model": self.model_name,
            }
            for row, text in zip(batch, result.texts)
        ]
