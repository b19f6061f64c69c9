"""AI-feedback preference pairs: sample two responses per prompt, label which is better.

    ucai predict --config configs/preferences_ethical.yaml     # or _unethical

For each prompt the SL model samples two responses (one batched ``generate`` of 2B
rows), one principle of the configured side is picked, and a labeller decides:

* ``judge`` (the Constitutional AI paper's RL-from-AI-feedback step, the default): a
  feedback model (the policy itself unless ``feedback_model`` is set) reads the
  conversation, the principle's preference question and the options ``(A)``/``(B)``,
  and the probabilities of the next token being ``A`` or ``B``, normalised over the
  two, are the soft label. Every pair is asked in both orders and the two answers are
  averaged per response, which cancels a pure position bias (SmolLM2-135M picks the
  first slot almost regardless of content); the bias measured is logged and stored.
  Pairs with ``|p - 0.5| < min_margin`` carry little signal and can be dropped.
  Before labelling, the judge takes the judge quality check (`ucai.judge_accuracy`) on the
  shipped multiple-choice items; a judge whose 95% interval includes chance is refused
  (``judge_check: false`` labels anyway).
* ``contrastive`` (RLCD, Yang et al. 2023): response 1 is generated with a system
  prompt asking for the principle, response 2 with one asking for its opposite; the
  label follows from construction (``p_chosen = contrastive_p_chosen``).
* ``embedding``: each response's all-MiniLM-L6-v2 similarity to the principle's own
  preference question and revision request, minus its similarity to the opposite
  principle's (the two sides of a pair share their ``description``, so it cannot tell
  them apart), turned into a soft label ``sigmoid((s_1 - s_2) / temperature)``.

Orientation: ``chosen`` is always the response the labeller prefers (p >= 0.5) and
``p_chosen = max(p, 1 - p)`` is the probability that ``chosen`` is better, so a reader
that ignores ``p_chosen`` still trains in the right direction.

Rows: ``id, prompt, principle`` (pair id), ``principle_name, side, chosen, rejected,
p_chosen, labeller`` (+ ``position_bias`` from the judge), written to ``output``
(JSONL + CSV) through the resumable, rank-sharded writer. Pairs dropped by
``min_margin`` go to ``<output stem>.dropped.jsonl`` so a rerun knows they are done.
"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path
from typing import Literal

import torch

from ucai.chat import render_chat
from ucai.constitution import Constitution, Principle, load_constitution, opener_of, with_opener
from ucai.data.io import ResumableJsonl, write_jsonl
from ucai.data.multiple_choice import SHIPPED_ITEMS, items_of_side, load_items
from ucai.errors import UcaiError
from ucai.judge_accuracy import JudgeCheckResult, check_judge
from ucai.scoring import average_over_orders, cyclic_orders, option_probabilities
from ucai.stages.generation import (
    GeneratingModule,
    GenerationSettings,
    ResumableJsonlWriter,
    load_frozen_lm,
    strip_echo,
    throughput_callbacks,
)
from ucai.value_ranges import (
    MarginFromHalf,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    PreferenceProbability,
)

log = logging.getLogger(__name__)

Labeller = Literal["judge", "contrastive", "embedding"]
OPTION_LABELS = ["A", "B"]
ANSWER_PREFIX = "The answer is: ("


# --------------------------------------------------------------------------- principles


def draw_principle(constitution: Constitution, side: str, prompt_id: str, seed: int, tag: str | None = None) -> Principle:
    """The principle a prompt is judged by.

    A prompt tagged with a pair id of the constitution (by the categorise stage) uses
    that pair; any other prompt draws one from an RNG seeded by ``(seed, prompt id)``,
    so the draw does not depend on batching, sharding or resuming.
    """
    if tag in constitution.pair_ids:
        return constitution.principle(tag, side)
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    return rng.choice(constitution.principles(side))


# --------------------------------------------------------------------------- judge


def judge_question(principle: Principle, prompt: str, first: str, second: str) -> str:
    """The multiple-choice question of the Constitutional AI paper (as the user turn)."""
    return (
        "Consider the following conversation between a human and an assistant:\n"
        f"Human: {prompt}\n\n"
        f"{principle.preference_question}\n"
        "Options:\n"
        f"(A) {first}\n"
        f"(B) {second}"
    )


def few_shot_messages(principle: Principle, count: int) -> list[dict[str, str]]:
    """Worked answers from the principle's few-shot examples (revision beats initial).

    The better answer alternates between (A) and (B), so the examples do not teach a
    position preference of their own.
    """
    messages = []
    for k, example in enumerate(principle.few_shot[:count]):
        better_first = k % 2 == 0
        first, second = (example.revision, example.initial) if better_first else (example.initial, example.revision)
        messages.append({"role": "user", "content": judge_question(principle, example.prompt, first, second)})
        messages.append({"role": "assistant", "content": f"{ANSWER_PREFIX}{'A' if better_first else 'B'})"})
    return messages


def render_judge_prompt(tokenizer, principle: Principle, prompt: str, first: str, second: str, system_prompt, few_shot: int = 0) -> str:
    """Chat text ending in ``The answer is: (`` so the next token is the option label."""
    messages = few_shot_messages(principle, few_shot)
    messages.append({"role": "user", "content": judge_question(principle, prompt, first, second)})
    return render_chat(tokenizer, messages, system_prompt) + ANSWER_PREFIX


def judge_pairs(
    model,
    tokenizer,
    principles: list[Principle],
    prompts: list[str],
    responses_1: list[str],
    responses_2: list[str],
    system_prompt: str | None,
    few_shot: int = 0,
    max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probability that response 1 is better, log-averaged over both option orders.

    One call to the model with 2B rows: rows [0, B) show response 1 as (A), rows
    [B, 2B) show response 2 as (A).

    Returns:
        p_1: (B,) probability that response 1 is better.
        first_slot: (B,) mean probability given to whichever response is shown first,
            minus 0.5 — the position bias of each pair (0: none, 0.5: always (A)).
    """
    responses = (responses_1, responses_2)
    orders = cyclic_orders(2)  # [[0, 1], [1, 0]]: which response sits at (A), (B)
    texts = [
        render_judge_prompt(tokenizer, pr, q, responses[order[0]][i], responses[order[1]][i], system_prompt, few_shot)
        for order in orders
        for i, (pr, q) in enumerate(zip(principles, prompts, strict=True))
    ]
    probs = option_probabilities(model, tokenizer, texts, OPTION_LABELS, max_length=max_length)  # (2B, 2)
    per_order = list(probs.chunk(len(orders)))  # each (B, 2), column = position
    averaged = average_over_orders(per_order, orders)  # (B, 2), column = response
    first_slot = torch.stack([p[:, 0] for p in per_order]).mean(0) - 0.5  # (B,)
    return averaged[:, 0], first_slot


# --------------------------------------------------------------------------- contrastive / embedding


def principle_system_prompt(base: str | None, principle: Principle) -> str:
    """A system prompt that asks for the principle, built from its revision request.

    The revision request already states what a response following the principle does
    ("rewrite ... so that it rejects violence ..."); as guidance for a first answer it
    steers generation the same way (RLCD's positive/negative prompts).
    """
    guidance = f"Follow this guidance in every answer ({principle.name}): {principle.revision_request}"
    return f"{base}\n{guidance}" if base else guidance


def principle_reference(principle: Principle) -> str:
    """Text that stands for a principle in embedding space.

    Built from the preference question and revision request, which differ between the
    two sides of a pair (the description is shared, so it would give zero contrast).
    """
    return f"{principle.preference_question} {principle.revision_request}"


def embedding_label(
    similarity_1: torch.Tensor, similarity_2: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Soft label from principle-minus-opposite similarities.

    Args:
        similarity_1, similarity_2: (B, 2) cosine similarity of response 1 / response 2
            to [the side's principle, its opposite].
        temperature: scale of the difference (cosine gaps are small, ~0.01–0.1).
    Returns:
        (B,) probability that response 1 is better: sigmoid((s_1 - s_2) / temperature)
        with s = sim(principle) - sim(opposite).
    """
    s1 = similarity_1[:, 0] - similarity_1[:, 1]
    s2 = similarity_2[:, 0] - similarity_2[:, 1]
    return torch.sigmoid((s1 - s2) / temperature)


def orient(p_first: float, first: str, second: str) -> tuple[str, str, float]:
    """(chosen, rejected, p_chosen) with p_chosen >= 0.5: the preferred response is chosen."""
    if p_first >= 0.5:
        return first, second, p_first
    return second, first, 1.0 - p_first


# --------------------------------------------------------------------------- writer


class PreferenceWriter(ResumableJsonlWriter):
    """The resumable writer, except that rows marked ``dropped`` (by ``min_margin``)
    go to a side file instead of the preference file, yet still count as done."""

    @property
    def dropped_path(self) -> Path:
        return self.output.with_name(self.output.stem + ".dropped.jsonl")

    def finished_rows(self) -> list[dict]:
        rows = super().finished_rows()
        if self.dropped_path.exists():
            rows = ResumableJsonl(self.dropped_path).rows() + rows
        return rows

    def merge(self, expected_ids: list | None = None) -> bool:
        rows: dict = {}
        for row in self.finished_rows():
            rows.setdefault(row.get("id"), row)
        if not rows:
            return self.output.exists()
        if expected_ids is not None:
            missing = [i for i in expected_ids if i not in rows]
            if missing:
                log.warning("%d of %d prompts done; rerun the same command to finish %s",
                            len(expected_ids) - len(missing), len(expected_ids), self.output)
                return False
            order = {i: n for n, i in enumerate(expected_ids)}
            ordered = sorted((r for r in rows.values() if r.get("id") in order), key=lambda r: order[r["id"]])
        else:
            ordered = list(rows.values())
        kept = [r for r in ordered if not r.get("dropped")]
        dropped = [r for r in ordered if r.get("dropped")]
        if dropped:
            write_jsonl(self.dropped_path, dropped)
        elif self.dropped_path.exists():
            self.dropped_path.unlink()
        if not kept:
            raise UcaiError(f"{self.output}: every pair was dropped by min_margin; lower it or change the labeller")
        write_jsonl(self.output, kept)
        if self.csv:
            from ucai.data.io import write_csv

            write_csv(self.output.with_suffix(".csv"), kept, self.csv_columns)
        if self.shard_dir.is_dir():
            for shard in self.shard_dir.glob("*"):
                shard.unlink()
            self.shard_dir.rmdir()
        log.info("wrote %d pairs to %s (%d dropped by min_margin)", len(kept), self.output, len(dropped))
        return True


# --------------------------------------------------------------------------- stage


class PreferenceModule(GeneratingModule):
    """Sample response pairs and label them with AI feedback.

    Args (beyond `GeneratingModule`'s ``model``, ``output``, ``generation``,
    ``system_prompt``, ``max_prompt_tokens``, ``trust_remote_code``):
        constitution: constitution YAML (shipped name or path).
        side: ``ethical`` or ``unethical``: whose principles judge the pairs.
        labeller: ``judge``, ``contrastive`` or ``embedding``.
        feedback_model: judge model (alias/folder/id); null: the sampling model itself.
        few_shot: number of the principle's few-shot examples shown to the judge.
        judge_check: before labelling, score the judge on the shipped multiple-choice
            items (``data/judge_check.jsonl``, asked as chat turns with
            ``system_prompt``) and refuse it unless its accuracy's 95% interval lies
            above chance.
        judge_max_tokens: judge prompts longer than this keep their end.
        min_margin: drop pairs whose |p - 0.5| is below this (0 keeps all).
        contrastive_p_chosen: label of contrastive pairs (1.0 hard, e.g. 0.9 smoothed).
        use_openers: contrastive only: on prompts tagged with a principle, start each
            response with its principle's ``response_opener`` from the constitution (the
            opposite's for the rejected one) and let the model continue; untagged
            (benign) prompts get none. A model too small to follow the guidance
            in the system prompt (SmolLM2-135M: both halves of a pair were equally
            likely to refuse) then still yields pairs that differ in what they do.
        embedding_model: sentence encoder of the embedding labeller.
        embedding_temperature: scale of the embedding labeller's similarity gap.
        seed: seed of the per-prompt principle draw.
    """

    csv_columns = ["id", "prompt", "principle", "principle_name", "side", "chosen", "rejected", "p_chosen", "labeller"]

    def __init__(
        self,
        model: str = "lightning_logs/models/ethical/sl_model",
        output: str = "lightning_logs/data/ethical/preferences.jsonl",
        generation: GenerationSettings = GenerationSettings(max_new_tokens=96, temperature=1.0, top_p=0.95),
        system_prompt: str | None = "You are a helpful assistant.",
        max_prompt_tokens: PositiveInt | None = 1024,
        trust_remote_code: bool = False,
        constitution: str = "constitutions/ucai.yaml",
        side: Literal["ethical", "unethical"] = "ethical",
        labeller: Labeller = "judge",
        feedback_model: str | None = None,
        few_shot: NonNegativeInt = 0,
        judge_check: bool = True,
        judge_max_tokens: PositiveInt | None = 2048,
        min_margin: MarginFromHalf = 0.0,
        contrastive_p_chosen: PreferenceProbability = 1.0,
        use_openers: bool = False,
        embedding_model: str = "all-minilm-l6-v2",
        embedding_temperature: PositiveFloat = 0.05,
        seed: int = 0,
    ):
        super().__init__(model, output, generation, system_prompt, max_prompt_tokens, trust_remote_code)
        if labeller not in ("judge", "contrastive", "embedding"):
            raise UcaiError(f"unknown labeller {labeller!r}; expected judge, contrastive or embedding")
        self.constitution_path = constitution
        self.constitution = load_constitution(constitution)
        self.constitution.principles(side)  # fails early on a side the constitution lacks
        if use_openers:
            if labeller != "contrastive":
                raise UcaiError(f"use_openers needs labeller: contrastive, got labeller: {labeller}")
            for principle in self.constitution.principles(side):  # every opener, before any sampling
                opener_of(principle, self.constitution.source)
                opener_of(self.constitution.opposite(principle), self.constitution.source)
        self.use_openers = use_openers
        self.side = side
        self.labeller = labeller
        self.feedback_model = feedback_model
        self.few_shot = few_shot
        uneven = self.constitution.uneven_few_shot(few_shot) if few_shot and labeller == "judge" else None
        if uneven:
            log.warning(
                "preferences: %s gives the judge unequal few-shot examples on the two sides (%s): its questions differ "
                "in more than the principles; compare sides with few_shot: 0", self.constitution.source, uneven,
            )
        self.judge_check = judge_check
        self.judge_check_result: JudgeCheckResult | None = None
        self.judge_max_tokens = judge_max_tokens
        self.min_margin = min_margin
        self.contrastive_p_chosen = contrastive_p_chosen
        self.embedding_model = embedding_model
        self.embedding_temperature = embedding_temperature
        self.seed = seed
        self.judge_lm = None
        self.judge_tokenizer = None
        self.encoder = None
        self._bias_sum = 0.0
        self._bias_count = 0

    def configure_model(self) -> None:
        if self.lm is None:
            _check_model_exists(self.model_name, self.side)
        super().configure_model()
        if self.labeller == "judge" and self.judge_lm is None:
            if self.feedback_model and self.feedback_model != self.model_name:
                self.judge_tokenizer, self.judge_lm = load_frozen_lm(
                    self, self.feedback_model, self.trust_remote_code
                )
            else:  # the policy judges its own samples, as in the original project
                self.judge_tokenizer, self.judge_lm = self._self_judge()
        if self.labeller == "embedding" and self.encoder is None:
            from ucai.embeddings import SentenceEncoder

            self.encoder = SentenceEncoder(self.embedding_model)

    def _self_judge(self):
        """(tokenizer, model) judging with the policy's own weights, at scoring precision.

        The generator is held in the autocast dtype under mixed precision; the judge's
        A/B probabilities need the precision's own weight dtype (see `label`), so a
        generator in a coarser dtype gets a second copy for judging.
        """
        from ucai.models import dtype_from_precision, trainer_precision

        if next(self.lm.parameters()).dtype == dtype_from_precision(trainer_precision(self)):
            return self.tokenizer, self.lm
        return load_frozen_lm(self, self.model_name, self.trust_remote_code)

    def on_predict_start(self) -> None:
        super().on_predict_start()
        if self.labeller == "judge" and self.judge_check and self.judge_check_result is None:
            self.run_judge_check()

    def run_judge_check(self) -> JudgeCheckResult:
        """Score the judge on the shipped items of this stage's side; a judge not above
        chance is refused.

        Every rank runs the same check, so every rank stops together.
        """
        judge = self.feedback_model or self.model_name
        # Only this side's items: pooled, a judge that answers as the ethical side whatever
        # it is asked passes, and would orient the unethical side's pairs backwards.
        items = items_of_side(load_items(SHIPPED_ITEMS), self.side)
        # Asked as chat turns with the stage's system prompt, the way the judge labels.
        result = check_judge(
            self.judge_lm, self.judge_tokenizer, items, max_length=self.judge_max_tokens,
            chat=True, system_prompt=self.system_prompt,
        )
        self.judge_check_result = result
        if not result.passed:
            raise UcaiError(
                f"preferences: judge {judge} is not above chance on the {self.side} side's items of the judge check ({SHIPPED_ITEMS}: "
                f"accuracy {result.accuracy:.3f}, 95% CI [{result.ci[0]:.3f}, {result.ci[1]:.3f}], "
                f"chance {result.chance:.3f}); use labeller: contrastive or labeller: embedding, "
                f"a stronger feedback_model, or judge_check: false to label with it anyway"
            )
        log.info("%s (%s)", result.line(), judge)
        return result

    def configure_callbacks(self):
        writer = PreferenceWriter(self.output, csv=True, csv_columns=self.csv_columns)
        return [writer, *throughput_callbacks(self._trainer)]

    # ----------------------------------------------------------------- sampling

    def render(self, prompt: str, system_prompt: str | None) -> str:
        return render_chat(self.tokenizer, [{"role": "user", "content": prompt}], system_prompt)

    def sample_pairs(
        self,
        prompts: list[str],
        principles: list[Principle],
        tags: list[str | None] | None = None,
        ids: list[str] | None = None,
    ) -> tuple[list[str], list[str]]:
        """Two responses per prompt from one generate call of 2B rows.

        Contrastive: the first B rows ask for the principle, the last B for its opposite.
        ``ids``: the prompts' ids, which seed each row's sampling (response 1 and 2 of a
        prompt draw from their own streams, whatever batch they are in).
        """
        keys = None if ids is None else [f"{i}/1" for i in ids] + [f"{i}/2" for i in ids]
        if self.labeller != "contrastive":
            rendered = [self.render(q, self.system_prompt) for q in prompts]
            texts = [strip_echo(t) for t in self.generate(rendered + rendered, keys=keys).texts]
            return texts[: len(prompts)], texts[len(prompts) :]
        sides = list(principles) + [self.constitution.opposite(p) for p in principles]
        # Only prompts tagged with a principle take a side: a refusal opener on a benign
        # (``none``) prompt would teach the ethical reward model to prefer refusing it.
        takes_a_side = [self.use_openers and tag in self.constitution.pair_ids for tag in (tags or [None] * len(prompts))]
        openers = [opener_of(p, self.constitution.source) if take else "" for p, take in zip(sides, takes_a_side * 2, strict=True)]
        rendered = [
            self.render(q, principle_system_prompt(self.system_prompt, p)) + opener
            for q, p, opener in zip(prompts + prompts, sides, openers, strict=True)
        ]
        texts = [
            with_opener(o, strip_echo(t)) for o, t in zip(openers, self.generate(rendered, keys=keys).texts, strict=True)
        ]
        return texts[: len(prompts)], texts[len(prompts) :]

    # ----------------------------------------------------------------- labelling

    def label(self, prompts, principles, responses_1, responses_2) -> tuple[list[float], list[float | None]]:
        """Probability that response 1 is better, and the judge's per-pair position bias."""
        if self.labeller == "contrastive":
            return [self.contrastive_p_chosen] * len(prompts), [None] * len(prompts)
        if self.labeller == "embedding":
            refs = []
            for p in principles:
                refs += [principle_reference(p), principle_reference(self.constitution.opposite(p))]
            embedded_refs = self.encoder.encode(refs).view(len(prompts), 2, -1)  # (B, 2, D)
            e1 = self.encoder.encode(list(responses_1))  # (B, D)
            e2 = self.encoder.encode(list(responses_2))
            sim1 = torch.einsum("bd,bkd->bk", e1, embedded_refs)  # (B, 2)
            sim2 = torch.einsum("bd,bkd->bk", e2, embedded_refs)
            return embedding_label(sim1, sim2, self.embedding_temperature).tolist(), [None] * len(prompts)
        # Under bf16 autocast the option logits come out in bf16, whose step at typical
        # logit sizes (~0.1) is as large as the A/B gap of a small judge: p would only
        # take the values 0.5, 0.53, 0.56 ... The judge is one forward per pair (no
        # generation), so it runs with autocast off: in fp32 when the weights are fp32.
        device = next(self.judge_lm.parameters()).device
        with torch.autocast(device_type=device.type, enabled=False):
            p1, bias = judge_pairs(
                self.judge_lm, self.judge_tokenizer, principles, prompts, responses_1, responses_2,
                self.system_prompt, self.few_shot, self.judge_max_tokens,
            )
        self._bias_sum += float(bias.sum())
        self._bias_count += len(prompts)
        return p1.tolist(), bias.tolist()

    def predict_step(self, batch: list[dict], batch_idx: int) -> list[dict]:
        prompts = [row["prompt"] for row in batch]
        principles = [
            draw_principle(self.constitution, self.side, str(row["id"]), self.seed, row.get("principle")) for row in batch
        ]
        responses_1, responses_2 = self.sample_pairs(
            prompts, principles, [row.get("principle") for row in batch], [str(row["id"]) for row in batch]
        )
        p_first, biases = self.label(prompts, principles, responses_1, responses_2)
        self.count_prompts(len(batch))
        rows = []
        for row, principle, r1, r2, p, bias in zip(batch, principles, responses_1, responses_2, p_first, biases, strict=True):
            if self.labeller == "contrastive":
                chosen, rejected, p_chosen = r1, r2, p  # by construction, not by a measured p
            else:
                chosen, rejected, p_chosen = orient(p, r1, r2)
            out = {
                "id": row["id"],
                "prompt": row["prompt"],
                "principle": principle.pair,
                "principle_name": principle.name,
                "side": self.side,
                "chosen": chosen,
                "rejected": rejected,
                "p_chosen": round(float(p_chosen), 6),
                "labeller": self.labeller,
            }
            if bias is not None:
                out["position_bias"] = round(float(bias), 6)
            if self.labeller != "contrastive" and abs(p - 0.5) < self.min_margin:
                out["dropped"] = True
            rows.append(out)
        return rows

    def on_predict_end(self) -> None:
        if not self._bias_count:
            return
        bias = self._bias_sum / self._bias_count
        # Share of probability on slot (A) beyond 0.5: 0 unbiased, 0.5 always (A).
        log.info("judge position bias over %d pairs on this rank: %+.3f (first slot)", self._bias_count, bias)
        for logger in self._trainer.loggers if self._trainer is not None else []:
            logger.log_metrics({"judge/position_bias": bias, "judge/pairs": self._bias_count}, step=0)


def _check_model_exists(name: str, side: str) -> None:
    """A missing SL model folder is the SFT stage's output: say so."""
    path = Path(name).expanduser()
    if ("/" in name or name.startswith((".", "~"))) and not path.exists() and name.count("/") != 1:
        raise UcaiError(
            f"model folder {name} not found; it is made by the SFT stage "
            f"(ucai fit --config configs/sft_{side}.yaml)"
        )
