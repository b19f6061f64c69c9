"""Sort prompts into the principles of a constitution (or any label set), or ``none``.

    ucai predict --config configs/categorise.yaml

The original project asked GPT-3.5 which of its four principles each red-team question
touches; ucai does it locally with one of two interchangeable categorisers:

* ``embedding`` — cosine similarity (all-MiniLM-L6-v2 by default) between the prompt
  and each label's description. ``none`` competes as a virtual label whose similarity
  is the ``threshold``, so a prompt close to no description is ``none``.
* ``multiple_choice`` — a zero-shot multiple-choice question to a causal LM, scored the
  way the Constitutional AI paper scores its questions: the next-token probability of
  each option letter, normalised over the options. Every label (``none of these``
  included) is shown in every position once (`cyclic_orders`) and the per-label
  log-probabilities are averaged (`average_over_orders`), which cancels the position
  bias of small models without squashing the remaining preference;
  ``calibrate`` also divides out the options' probabilities for a content-free prompt.
  SmolLM2-135M is at chance on this task; use it with a larger instruction-tuned
  model, or use the embedding categoriser.

Labels are the constitution's pairs (id + the ethical side's description) or an
explicit list ``[{id, description}, ...]`` in the config, so the same stage sorts
conversations into any categories. Rows keep every input field and gain
``principle`` and ``principle_confidence`` (a tag the input already had is kept as
``input_principle``); counts per label go to the log. With
``max_per_principle`` the final file keeps at most that many prompts per label (the
most confident, in input order), while the full categorisation stays beside it in
``<output stem>.all.jsonl`` so a rerun resumes and re-balances identically. Like every
predict stage, a rerun keeps the rows already written: delete the output (and its
``.all`` file) to categorise again with other settings.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import torch

from ucai.chat import render_chat
from ucai.data.io import ResumableJsonl, require_writable, write_csv, write_jsonl
from ucai.errors import UcaiError
from ucai.scoring import OPTION_LETTERS, average_over_orders, cyclic_orders, option_probabilities
from ucai.stages.generation import ResumableJsonlWriter, load_frozen_lm, predict_callbacks
from ucai.value_ranges import PositiveFloat, PositiveInt

log = logging.getLogger(__name__)

NONE_LABEL = "none"
NONE_DESCRIPTION = "None of these categories applies."

DEFAULT_QUESTION = (
    "Which category does the following request belong to?\n\n"
    "Request: {prompt}\n\n"
    "Options:\n{options}\n\n"
    "Answer with the letter of the best option."
)
# The assistant's reply is pre-filled up to the opening parenthesis, so the next token
# is the option letter (the paper's "The answer is: (" trick).
DEFAULT_ANSWER_PREFIX = "The answer is ("


@dataclass(frozen=True)
class Label:
    """One category: the id written to ``principle`` and the text it is recognised by."""

    id: str
    description: str


def labels_from_config(labels: list[dict] | None, constitution: str, source: str = "config") -> list[Label]:
    """The label set: the explicit ``labels`` list, else the constitution's pairs."""
    if labels is None:
        from ucai.constitution import load_constitution

        loaded = load_constitution(constitution)
        return [Label(pair.id, pair.ethical.description) for pair in loaded.pairs]
    if not isinstance(labels, list) or not labels:
        raise UcaiError(f"{source}: 'labels' must be a non-empty list of {{id, description}}")
    parsed, seen = [], set()
    for index, item in enumerate(labels):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) and item[k].strip() for k in ("id", "description")):
            raise UcaiError(f"{source}: labels[{index}] needs non-empty string fields 'id' and 'description'")
        if item["id"] in seen or item["id"] == NONE_LABEL:
            raise UcaiError(f"{source}: labels[{index}]: id {item['id']!r} is repeated or reserved")
        seen.add(item["id"])
        parsed.append(Label(item["id"].strip(), item["description"].strip()))
    return parsed


def embedding_decision(
    similarities: torch.Tensor, threshold: float, temperature: float, confidence: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick a label per row from cosine similarities, with ``none`` as a virtual label.

    Args:
        similarities: (B, K) cosine similarity of each prompt to each label description.
        threshold: similarity of the virtual ``none`` label (column K).
        temperature: softmax temperature over similarities (cosines differ by a few
            hundredths, so values around 0.05 give usable spreads).
        confidence: ``softmax`` (probability of the chosen column among the K labels
            and ``none``) or ``similarity`` (the best cosine similarity; for ``none`` it
            says how close the nearest label came).
    Returns:
        choice: (B,) long in [0, K]; K means ``none``.
        score: (B,) float confidence of the choice.
    """
    batch = similarities.shape[0]
    scores = torch.cat([similarities, torch.full((batch, 1), threshold, dtype=similarities.dtype)], dim=1)
    choice = scores.argmax(dim=1)  # (B,)
    if confidence == "softmax":
        probabilities = torch.softmax(scores / temperature, dim=1)  # (B, K + 1)
        score = probabilities.gather(1, choice[:, None]).squeeze(1)
    else:
        score = similarities.max(dim=1).values
    return choice, score


def multiple_choice_question(prompt: str, descriptions: list[str], template: str = DEFAULT_QUESTION) -> str:
    """The question text with options ``(A) ...``, ``(B) ...`` in the given order."""
    options = "\n".join(f"({OPTION_LETTERS[i]}) {text}" for i, text in enumerate(descriptions))
    return template.format(prompt=prompt, options=options)


def multiple_choice_scores(
    model,
    tokenizer,
    prompts: list[str],
    descriptions: list[str],
    system_prompt: str | None,
    template: str = DEFAULT_QUESTION,
    answer_prefix: str = DEFAULT_ANSWER_PREFIX,
    max_length: int | None = None,
) -> torch.Tensor:
    """Probability of each option, log-averaged over K cyclic orders to cancel position bias.

    Args:
        prompts: B prompts to categorise.
        descriptions: K option texts (label descriptions, ``none of these`` included).
    Returns:
        (B, K) rows summing to 1; column ``i`` is ``descriptions[i]`` whatever position
        it was shown in.
    """
    k = len(descriptions)
    if k > len(OPTION_LETTERS):
        raise UcaiError(f"multiple choice supports at most {len(OPTION_LETTERS)} labels, got {k}")
    letters = list(OPTION_LETTERS[:k])
    orders = cyclic_orders(k)
    per_order = []
    for order in orders:
        shown = [descriptions[option] for option in order]  # position -> option text
        texts = [
            render_chat(
                tokenizer,
                [{"role": "user", "content": multiple_choice_question(p, shown, template)}],
                system_prompt,
            )
            + answer_prefix
            for p in prompts
        ]
        per_order.append(option_probabilities(model, tokenizer, texts, letters, max_length=max_length))
    return average_over_orders(per_order, orders)


def calibrated(probabilities: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Divide out a prompt-independent preference and renormalise.

    Args:
        probabilities: (B, K) option probabilities for real prompts.
        prior: (K,) the same for a content-free prompt.
    Returns:
        (B, K) rows summing to 1.
    """
    scaled = probabilities / prior.clamp(min=1e-12)
    return scaled / scaled.sum(dim=1, keepdim=True)


class CategoriseModule(L.LightningModule):
    """Tag each prompt with one label (or ``none``) and a confidence.

    Args:
        categoriser: ``embedding`` (sentence-embedding similarity) or
            ``multiple_choice`` (zero-shot letter probabilities of a causal LM).
        output: the prompts JSONL this stage writes (CSV twin beside it).
        constitution: constitution whose pairs are the labels (id + description).
        labels: explicit label set ``[{id, description}, ...]``; replaces the
            constitution's pairs when given.
        encoder: sentence encoder alias, folder or hub id (embedding categoriser).
        threshold: cosine similarity below which a prompt is ``none`` (embedding).
        temperature: softmax temperature turning similarities into a confidence.
        confidence: ``softmax`` or ``similarity`` (see `embedding_decision`).
        model: causal LM alias, folder or hub id (multiple-choice categoriser).
        system_prompt: system message of the multiple-choice question.
        question: template with ``{prompt}`` and ``{options}``.
        answer_prefix: text the assistant turn starts with; the next token is the letter.
        include_none: offer ``none of these`` as an option (multiple choice).
        calibrate: divide each option's probability by its probability for the
            content-free prompt ``content_free`` (contextual calibration, Zhao et al.
            2021), which removes a preference for some option texts whatever the
            prompt; order averaging removes the preference for positions.
        content_free: the prompt used to measure that prior.
        max_prompt_tokens: questions longer than this are truncated from the left.
        max_per_principle: keep at most this many prompts per label in the output
            (the most confident); null keeps all.
        trust_remote_code: allow custom model code from the hub (off unless you ask).
    """

    def __init__(
        self,
        categoriser: Literal["embedding", "multiple_choice"] = "embedding",
        output: str = "lightning_logs/data/prompts.jsonl",
        constitution: str = "constitutions/ucai.yaml",
        labels: list[dict] | None = None,
        encoder: str = "all-minilm-l6-v2",
        threshold: float = 0.12,
        temperature: PositiveFloat = 0.05,
        confidence: Literal["softmax", "similarity"] = "softmax",
        model: str = "smollm2-135m",
        system_prompt: str | None = "You are a helpful assistant.",
        question: str = DEFAULT_QUESTION,
        answer_prefix: str = DEFAULT_ANSWER_PREFIX,
        include_none: bool = True,
        calibrate: bool = False,
        content_free: str = "N/A",
        max_prompt_tokens: PositiveInt | None = 1024,
        max_per_principle: PositiveInt | None = None,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        if categoriser not in ("embedding", "multiple_choice"):
            raise UcaiError(f"categoriser must be 'embedding' or 'multiple_choice', got {categoriser!r}")
        require_writable(output, "--model.init_args.output")
        self.categoriser = categoriser
        self.output = output
        self.labels = labels_from_config(labels, constitution)
        self.encoder_name = encoder
        self.threshold = threshold
        self.temperature = temperature
        self.confidence = confidence
        self.model_name = model
        self.system_prompt = system_prompt
        self.question = question
        self.answer_prefix = answer_prefix
        self.include_none = include_none
        self.calibrate = calibrate
        self.content_free = content_free
        self._prior: torch.Tensor | None = None
        self.max_prompt_tokens = max_prompt_tokens
        self.max_per_principle = max_per_principle
        self.trust_remote_code = trust_remote_code
        self.encoder = None
        self.lm = None
        self.tokenizer = None
        self._label_vectors: torch.Tensor | None = None
        self.counts: Counter = Counter()

    # ------------------------------------------------------------------ set-up
    @property
    def categorised_path(self) -> Path:
        """Where the writer keeps every categorised row (the output itself when unbalanced)."""
        output = Path(self.output)
        if self.max_per_principle is None:
            return output
        return output.with_name(output.stem + ".all" + output.suffix)

    def configure_model(self) -> None:
        if self.categoriser == "embedding":
            if self.encoder is None:
                from ucai.embeddings import SentenceEncoder

                self.encoder = SentenceEncoder(self.encoder_name)
                # A submodule, so Lightning moves it to the stage's device.
                self.encoder_model = self.encoder.model
        elif self.lm is None:
            self.tokenizer, self.lm = load_frozen_lm(self, self.model_name, self.trust_remote_code)

    def configure_callbacks(self):
        columns = None  # every input field is kept, whatever the file has
        return predict_callbacks(self._trainer, self.categorised_path, csv_columns=columns)

    def on_predict_start(self) -> None:
        self.counts = Counter()
        if self.encoder is not None:
            self.encoder.device = self.device
            self._label_vectors = self.encoder.encode([label.description for label in self.labels])

    # ------------------------------------------------------------------ scoring
    def label_ids(self) -> list[str]:
        ids = [label.id for label in self.labels]
        if self.categoriser == "multiple_choice" and self.include_none:
            ids.append(NONE_LABEL)
        return ids

    def categorise(self, prompts: list[str]) -> tuple[list[str], list[float]]:
        """Label and confidence for each prompt."""
        if self.categoriser == "embedding":
            similarities = (self.encoder.encode(prompts) @ self._label_vectors.T).cpu()  # (B, K)
            choice, score = embedding_decision(similarities, self.threshold, self.temperature, self.confidence)
            ids = self.label_ids() + [NONE_LABEL]
        else:
            descriptions = [label.description for label in self.labels]
            if self.include_none:
                descriptions.append(NONE_DESCRIPTION)
            probabilities = multiple_choice_scores(
                self.lm,
                self.tokenizer,
                prompts,
                descriptions,
                self.system_prompt,
                self.question,
                self.answer_prefix,
                self.max_prompt_tokens,
            )  # (B, K)
            if self.calibrate:
                probabilities = calibrated(probabilities, self._content_free_prior(descriptions))
            score, choice = probabilities.max(dim=1)
            ids = self.label_ids()
        return [ids[i] for i in choice.tolist()], [round(float(s), 4) for s in score]

    def _content_free_prior(self, descriptions: list[str]) -> torch.Tensor:
        """(K,) option probabilities for the content-free prompt, computed once per run."""
        if self._prior is None:
            self._prior = multiple_choice_scores(
                self.lm, self.tokenizer, [self.content_free], descriptions, self.system_prompt,
                self.question, self.answer_prefix, self.max_prompt_tokens,
            )[0]
        return self._prior

    def predict_step(self, batch: list[dict], batch_idx: int) -> list[dict]:
        names, scores = self.categorise([row["prompt"] for row in batch])
        self.counts.update(names)
        rows = []
        for row, name, score in zip(batch, names, scores, strict=True):
            out = dict(row)
            if row.get("principle") is not None:  # the input's own tag, kept for comparison
                out["input_principle"] = row["principle"]
            out.update(principle=name, principle_confidence=score)
            rows.append(out)
        return rows

    # ------------------------------------------------------------------ end of run
    def on_predict_end(self) -> None:
        log.info("categorised in this run (rank %d): %s", self.global_rank, dict(self.counts))

    def teardown(self, stage: str) -> None:
        # Teardown runs after the writer merged the shards, and also when a rerun found
        # every prompt done and skipped the predict loop, so a changed
        # max_per_principle is applied without categorising again.
        if stage == "predict" and self._trainer is not None and self._trainer.is_global_zero:
            self.finish()

    def finish(self) -> None:
        """Log counts of the complete file and write the balanced output if asked."""
        path = self.categorised_path
        writer_shards = ResumableJsonlWriter(path).shard_dir
        if writer_shards.is_dir() or not path.exists():
            return  # not complete yet: the writer said how many rows are missing
        rows = ResumableJsonl(path).rows()
        log.info("principle counts: %s", dict(Counter(row.get("principle") for row in rows)))
        if self.max_per_principle is None:
            return
        kept = balance(rows, self.max_per_principle)
        write_jsonl(self.output, kept)
        write_csv(Path(self.output).with_suffix(".csv"), kept)
        log.info(
            "kept %d of %d prompts (at most %d per principle) in %s: %s",
            len(kept), len(rows), self.max_per_principle, self.output,
            dict(Counter(row.get("principle") for row in kept)),
        )


def balance(rows: list[dict], max_per_principle: int) -> list[dict]:
    """At most ``max_per_principle`` rows per label: the most confident, ties by input order.

    The result keeps the input order, so it is the same however the rows were sharded.
    """
    ranked = sorted(
        range(len(rows)), key=lambda i: (-float(rows[i].get("principle_confidence") or 0.0), i)
    )
    taken: Counter = Counter()
    keep = set()
    for index in ranked:
        label = rows[index].get("principle")
        if taken[label] < max_per_principle:
            taken[label] += 1
            keep.add(index)
    return [row for index, row in enumerate(rows) if index in keep]
