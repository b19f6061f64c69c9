"""Sentence embeddings (all-MiniLM-L6-v2 by default) for categorising and scoring.

Mean pooling over real tokens followed by L2 normalisation, as sentence-transformers
does for this model, so cosine similarity is a dot product. Any Hugging Face encoder
folder or id works in place of the default.
"""

from __future__ import annotations

import torch

from ucai.models import MINILM_ALIAS, named_load_errors, resolve_model


class SentenceEncoder:
    """Encode texts to unit vectors.

    Args:
        model: encoder alias, folder or hub id (default: the shipped all-MiniLM-L6-v2).
        device: where to run; defaults to CPU.
        max_length: tokens per text (MiniLM was trained on 256).
    """

    def __init__(self, model: str = MINILM_ALIAS, device: str | torch.device = "cpu", max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer

        location = resolve_model(model).location
        with named_load_errors(model):
            self.tokenizer = AutoTokenizer.from_pretrained(location)
            self.model = AutoModel.from_pretrained(location).to(device).eval()
        self.device = torch.device(device)
        self.max_length = max_length

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Returns (N, D) float32 unit vectors, one per text."""
        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state  # (b, T, D)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            chunks.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
        if not chunks:
            return torch.empty(0, self.model.config.hidden_size)
        return torch.cat(chunks)

    def similarity(self, texts: list[str], references: list[str]) -> torch.Tensor:
        """(N, R) cosine similarity of each text to each reference."""
        return self.encode(texts) @ self.encode(references).T
