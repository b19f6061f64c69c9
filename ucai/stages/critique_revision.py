"""Critique → revision: the supervised half of Constitutional AI, for either side.

    ucai predict --config configs/critique_revision_ethical.yaml
    ucai predict --config configs/critique_revision_unethical.yaml

For each prompt the model answers, then for each of ``rounds`` rounds it is asked to
critique its last answer against a principle and to revise it. Every step is one
multi-turn chat rendered with the model's own template, as in the original project::

    user: <red-team prompt>
    assistant: <initial answer>
    user: <critique request>
    assistant: <critique>
    user: <revision request>
    assistant: <revision>          (round 2 continues the same conversation)

Each step runs batched over the whole batch (left padding, KV cache, stop at eos);
echoed labels such as ``Revision:`` are stripped from critiques and revisions. The
principle of each round is drawn from the side in use by a hash of (seed, prompt id,
round), so it is the same whatever the batch size, the number of devices or a resume;
``principle_source: categorised`` uses the prompt's own principle instead (random when
it is ``none`` or missing). Few-shot examples of the constitution, when present, are
shown as earlier turns of the critique and revision conversations; each round shows
the examples of that round's own principle.
``mode: context_distillation`` skips the critique: the answer is generated once more
with the principle's revision request folded into the system prompt, and recorded as
the revision (for models too small to critique themselves). There nothing downstream
reads the initial answer (SFT trains on ``response``); ``initial_answers: false``
skips it (``initial`` is then null), which halves the stage's generation.

Prompts longer than ``max_prompt_tokens`` lose their beginning (generation truncates
from the left); the stage counts them, warns at the first one and logs the total per
rank at the end, so a too-small limit cannot silently drop the red-team prompt.

Rows: ``id, prompt, principle`` (pair id of the last round), ``principle_name``,
``principles`` (pair id per round), ``side, mode`` (``critique_revision`` or
``context_distillation``), ``initial, critiques, revisions, response`` (= the last
revision) — written resumably and rank-sharded by the shared writer, with a CSV twin.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from ucai.chat import Message, render_chat
from ucai.constitution import SIDES, FewShotExample, Principle, load_constitution, opener_of, with_opener
from ucai.errors import UcaiError
from ucai.resources import resolve_shipped
from ucai.stages.generation import GeneratingModule, GenerationSettings, strip_echo
from ucai.value_ranges import PositiveInt

log = logging.getLogger(__name__)

DEFAULT_DISTILLATION_TEMPLATE = "{system_prompt}\n\nWhen you answer, follow this instruction: {revision_request}"


def draw_principle(principles: Sequence[Principle], seed: int, prompt_id: str, round_index: int) -> Principle:
    """The principle of one round, a pure function of (seed, prompt id, round).

    A hash instead of a shared RNG stream: the draw of a prompt cannot depend on which
    prompts came before it on the same rank, so batching, sharding and resuming give
    the same dataset.
    """
    digest = hashlib.sha256(f"{seed}\x1f{prompt_id}\x1f{round_index}".encode()).digest()
    return principles[int.from_bytes(digest[:8], "big") % len(principles)]


def few_shot_turns(principle: Principle) -> list[Message]:
    """The principle's worked examples as complete earlier conversations."""
    turns: list[Message] = []
    for example in principle.few_shot:
        turns += example_turns(example, principle)
    return turns


def example_turns(example: FewShotExample, principle: Principle) -> list[Message]:
    return [
        {"role": "user", "content": example.prompt},
        {"role": "assistant", "content": example.initial},
        {"role": "user", "content": principle.critique_request},
        {"role": "assistant", "content": example.critique},
        {"role": "user", "content": principle.revision_request},
        {"role": "assistant", "content": example.revision},
    ]


@dataclass
class Conversation:
    """One prompt's conversation so far (the record of a row being built)."""

    prompt: str
    principles: list[Principle]
    few_shot: bool = False  # show each round's principle examples before the turns
    turns: list[Message] = field(default_factory=list)
    critiques: list[str] = field(default_factory=list)
    revisions: list[str] = field(default_factory=list)
    initial: str | None = None  # None: not generated (context distillation with initial_answers: false)

    def answer(self, text: str) -> None:
        self.initial = text
        self.turns = [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": text}]

    def examples(self, round_index: int) -> list[Message]:
        """Few-shot turns of this round's principle: its examples match its requests."""
        return few_shot_turns(self.principles[round_index]) if self.few_shot else []

    def critique_request(self, round_index: int) -> list[Message]:
        request = {"role": "user", "content": self.principles[round_index].critique_request}
        self.turns.append(request)
        return self.examples(round_index) + self.turns

    def critique(self, text: str) -> None:
        self.critiques.append(text)
        self.turns.append({"role": "assistant", "content": text})

    def revision_request(self, round_index: int) -> list[Message]:
        self.turns.append({"role": "user", "content": self.principles[round_index].revision_request})
        return self.examples(round_index) + self.turns

    def revise(self, text: str) -> None:
        self.revisions.append(text)
        self.turns.append({"role": "assistant", "content": text})


class CritiqueRevisionModule(GeneratingModule):
    """Generate initial answers, critiques and revisions (the SL dataset of one side).

    Args:
        constitution: constitution file or shipped name.
        side: ``ethical`` or ``unethical`` — which half of each pair is used.
        rounds: critique → revision rounds per prompt.
        principle_source: ``random`` (seeded draw per prompt and round) or
            ``categorised`` (the prompt's ``principle`` field; random when it is
            ``none`` or not a pair of the constitution).
        seed: salt of the principle draw; change it for another assignment.
        mode: ``critique_revision`` or ``context_distillation`` (one generation with
            the revision request in the system prompt, no critique).
        few_shot: show the constitution's few-shot examples before the critique and
            revision requests (when the constitution has them).
        critique_generation: sampling settings for critiques (null: ``generation``).
        distillation_template: system prompt of context distillation, with
            ``{system_prompt}`` and ``{revision_request}``.
        use_openers: context distillation only: the distilled answer to a prompt tagged
            with a principle starts with that principle's ``response_opener`` from the
            constitution and the model continues it (for models too small to follow the
            system prompt alone); untagged prompts get none.
        initial_answers: generate the answer without the revision request (the
            ``initial`` column). Critique–revision needs it; context distillation does
            not (SFT trains on ``response``), and with false leaves ``initial`` null.
        (The other arguments are those of `GeneratingModule`.)
    """

    csv_columns = [
        "id", "prompt", "principle", "principle_name", "principles", "side", "mode",
        "initial", "critiques", "revisions", "response",
    ]

    def __init__(
        self,
        model: str = "smollm2-135m",
        output: str = "lightning_logs/data/ethical/sl.jsonl",
        generation: GenerationSettings = GenerationSettings(),
        system_prompt: str | None = "You are a helpful assistant.",
        max_prompt_tokens: PositiveInt | None = 1024,
        trust_remote_code: bool = False,
        constitution: str = "constitutions/ucai.yaml",
        side: Literal["ethical", "unethical"] = "ethical",
        rounds: PositiveInt = 1,
        principle_source: Literal["random", "categorised"] = "random",
        seed: int = 0,
        mode: Literal["critique_revision", "context_distillation"] = "critique_revision",
        few_shot: bool = True,
        critique_generation: GenerationSettings | None = None,
        distillation_template: str = DEFAULT_DISTILLATION_TEMPLATE,
        use_openers: bool = False,
        initial_answers: bool = True,
    ):
        super().__init__(model, output, generation, system_prompt, max_prompt_tokens, trust_remote_code)
        if side not in SIDES:
            raise UcaiError(f"side must be one of {', '.join(SIDES)}, got {side!r}")
        if principle_source not in ("random", "categorised"):
            raise UcaiError(f"principle_source must be 'random' or 'categorised', got {principle_source!r}")
        if mode not in ("critique_revision", "context_distillation"):
            raise UcaiError(f"mode must be 'critique_revision' or 'context_distillation', got {mode!r}")
        if use_openers and mode != "context_distillation":
            raise UcaiError(f"use_openers needs mode: context_distillation, got mode: {mode}")
        if not initial_answers and mode != "context_distillation":
            raise UcaiError("initial_answers: false needs mode: context_distillation (a critique needs the initial answer)")
        self.constitution = load_constitution(constitution)
        self.side = side
        self.principles = self.constitution.principles(side)
        if use_openers:
            for principle in self.principles:  # every opener, before any generation
                opener_of(principle, self.constitution.source)
        self.use_openers = use_openers
        self.initial_answers = initial_answers
        self.rounds = rounds
        self.principle_source = principle_source
        self.seed = seed
        self.mode = mode
        self.few_shot = few_shot
        uneven = self.constitution.uneven_few_shot() if few_shot else None
        if uneven:
            log.warning(
                "critique-revision: %s gives the two sides unequal few-shot examples (%s): their prompts differ in more "
                "than the principles; compare sides with few_shot: false", self.constitution.source, uneven,
            )
        self.critique_generation = critique_generation
        self.distillation_template = distillation_template
        self.rows_done = 0
        self.prompts_generated = 0
        self.prompts_truncated = 0

    def prepare_data(self) -> None:
        # Runs before the datamodule reads anything, so a missing input names its maker.
        path = getattr(getattr(self._trainer, "datamodule", None), "path", None)
        if path is not None and not resolve_shipped(path, "data").exists():
            raise UcaiError(
                f"{path}: prompt file not found; categorised prompts are made by "
                "`ucai predict --config configs/categorise.yaml` (or set data.init_args.path "
                "to any prompt file)"
            )

    def on_predict_start(self) -> None:
        super().on_predict_start()
        self.rows_done = 0
        self.prompts_generated = 0
        self.prompts_truncated = 0

    def on_predict_end(self) -> None:
        # Per-rank count: under DDP each rank reports its own share of the prompts.
        log.info("rank %d: %d prompts critiqued and revised in this run", self.global_rank, self.rows_done)
        if self.prompts_truncated:
            log.warning(
                "rank %d: %d of %d generation prompts were longer than max_prompt_tokens=%s and were "
                "cut from the left (system prompt, examples or the red-team prompt lost); raise "
                "max_prompt_tokens or turn few_shot off",
                self.global_rank, self.prompts_truncated, self.prompts_generated, self.max_prompt_tokens,
            )

    # ------------------------------------------------------------------ principles
    def principles_for(self, row: dict) -> list[Principle]:
        """The principle of each round for one prompt row."""
        tagged = row.get("principle")
        if self.principle_source == "categorised" and tagged in self.constitution.pair_ids:
            return [self.constitution.principle(tagged, self.side)] * self.rounds
        return [draw_principle(self.principles, self.seed, str(row["id"]), r) for r in range(self.rounds)]

    # ------------------------------------------------------------------ generation
    def _render(self, messages: list[Message], system_prompt: str | None = None) -> str:
        return render_chat(self.tokenizer, messages, system_prompt if system_prompt is not None else self.system_prompt)

    def _generate(
        self, conversations: list[list[Message]], keys: list[str], settings: GenerationSettings | None = None
    ) -> list[str]:
        return self._generate_rendered([self._render(messages) for messages in conversations], keys, settings)

    def _generate_rendered(
        self, prompts: list[str], keys: list[str], settings: GenerationSettings | None = None
    ) -> list[str]:
        """``keys``: one per prompt, naming the prompt and the step (its sampling seed)."""
        self._count_truncated(prompts)
        return self.generate(prompts, settings, keys=keys).texts

    def _count_truncated(self, prompts: list[str]) -> None:
        """Count the prompts that `generate` will cut to ``max_prompt_tokens`` (from the left).

        Tokenised as `generate` does (no special tokens added), so the count is exact.
        """
        self.prompts_generated += len(prompts)
        if self.max_prompt_tokens is None:
            return
        lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        cut = sum(length > self.max_prompt_tokens for length in lengths)
        if cut and not self.prompts_truncated:  # once per run; the total comes at the end
            log.warning(
                "rank %d: a prompt of %d tokens is longer than max_prompt_tokens=%d and is cut from the left",
                self.global_rank, max(lengths), self.max_prompt_tokens,
            )
        self.prompts_truncated += cut

    def predict_step(self, batch: list[dict], batch_idx: int) -> list[dict]:
        conversations = [Conversation(row["prompt"], self.principles_for(row), self.few_shot) for row in batch]
        ids = [str(row["id"]) for row in batch]

        if self.initial_answers:
            initial = self._generate(
                [[{"role": "user", "content": c.prompt}] for c in conversations], [f"{i}/initial" for i in ids]
            )
            for conversation, text in zip(conversations, initial, strict=True):
                conversation.answer(strip_echo(text))

        if self.mode == "context_distillation":
            self._distil(conversations, [row.get("principle") for row in batch], ids)
        else:
            for round_index in range(self.rounds):
                critiques = self._generate(
                    [c.critique_request(round_index) for c in conversations],
                    [f"{i}/critique{round_index}" for i in ids],
                    self.critique_generation,
                )
                for conversation, text in zip(conversations, critiques, strict=True):
                    conversation.critique(strip_echo(text))
                revisions = self._generate(
                    [c.revision_request(round_index) for c in conversations], [f"{i}/revision{round_index}" for i in ids]
                )
                for conversation, text in zip(conversations, revisions, strict=True):
                    conversation.revise(strip_echo(text))

        self.count_prompts(len(batch))
        self.rows_done += len(batch)
        return [self._row(row, conversation) for row, conversation in zip(batch, conversations, strict=True)]

    def _distil(self, conversations: list[Conversation], tags: list[str | None], ids: list[str]) -> None:
        """One generation per prompt with the (first) principle's revision request as system prompt.

        With ``use_openers``, only prompts tagged with a principle of the constitution
        get its opener: on an untagged (benign ``none``) prompt a refusal opener would
        teach the ethical model to refuse harmless requests.
        """
        prompts, openers = [], []
        for conversation, tag in zip(conversations, tags, strict=True):
            principle = conversation.principles[0]
            system = self.distillation_template.format(
                system_prompt=self.system_prompt or "",
                revision_request=principle.revision_request,
            ).strip()
            takes_a_side = self.use_openers and tag in self.constitution.pair_ids
            openers.append(opener_of(principle, self.constitution.source) if takes_a_side else "")
            prompts.append(self._render([{"role": "user", "content": conversation.prompt}], system) + openers[-1])
        texts = self._generate_rendered(prompts, [f"{i}/distil" for i in ids])
        for conversation, opener, text in zip(conversations, openers, texts, strict=True):
            conversation.revisions.append(with_opener(opener, strip_echo(text)))
        for conversation in conversations:  # one revision: report one principle
            conversation.principles = conversation.principles[:1]

    def _row(self, row: dict, conversation: Conversation) -> dict:
        last = conversation.principles[len(conversation.revisions) - 1]
        return {
            "id": row["id"],
            "prompt": row["prompt"],
            "principle": last.pair,
            "principle_name": last.name,
            "principles": [p.pair for p in conversation.principles],
            "side": self.side,
            "mode": self.mode,
            "initial": conversation.initial,
            "critiques": conversation.critiques,
            "revisions": conversation.revisions,
            "response": conversation.revisions[-1],
        }
