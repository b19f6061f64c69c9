"""Evaluation: the ethical-vs-unethical experiment, as a Lightning test stage.

    ucai test --config configs/eval.yaml

Every model in ``models`` (by default the base model and the SL and RL models of both
sides) answers the held-out prompts (`PromptDataModule` ``split: heldout``, prompts no
stage trained on) with the same generation settings and the same seed per batch. The
answers are then scored, one scoring model in memory at a time:

* ``rm_<side>`` — each side's reward model, its [0, 1] score (sigmoid of the reward
  normalised by the training-set mean and std);
* ``judge_<pair>`` — a judge LM's probability that the answer *upholds* the principle
  (``criterion_side`` half of each pair), from the option-label log-probs of an
  upholds/violates question asked in both option orders and averaged (cancels the
  position bias of small judges); ``judge_mean`` averages the principles;
* ``emb_<pair>_<side>`` — all-MiniLM-L6-v2 cosine similarity of the answer to each
  principle and its opposite (principle name + preference question);
  ``emb_margin`` — mean over pairs of (criterion side - opposite side);
* ``refusal`` (phrase list), ``length_words``, ``distinct_1``, ``distinct_2``,
  ``repetition_4`` (degeneration, the usual failure of small RL'd models).

Pairwise comparisons (``comparisons``, default SL vs RL per side and ethical RL vs
unethical RL, plus base vs SL so all five models meet in one Elo graph) are judged per
principle with the judge's preference question, both orders averaged; win rates carry
prompt-cluster bootstrap 95% intervals and Elo ratings are fitted to all judgements
(`ucai.stats.elo_ratings`). Before any of that the judge answers the shipped judge
check (`ucai.judge_accuracy`); a judge at chance is marked in the summary and the report.

Paired differences (``differences``) are one family of tests, corrected together
(``correction``: Holm by default): ethical RL vs unethical RL on every scorer, and RL
vs SL of each side on that side's own reward model. Each is an exact (or Monte Carlo)
sign-flip test over prompts with the interval that inverts it at the corrected level
(`ucai.stats.sign_flip_test`). ``rm_correlation`` is the Pearson correlation of the
two reward models' scores over every evaluated answer.

Outputs in ``output_dir``: ``scores.jsonl`` (+ CSV; ``model, id, prompt, principle,
response`` and one column per scorer), ``pairwise.jsonl``, ``depth_scores.jsonl`` (the
depth analysis's rows: answers without their opener, prefill-swap continuations; see
`ucai.stages.inversion_depth`), ``summary.json`` (its ``timings``: wall seconds by
part, the depth analysis's and the train-prompt answers' parts apart, also one log
line) and ``report.md`` with PNG plots (`ucai.report`). Generated answers are cached in
``output_dir/cache/`` keyed by model and generation settings, so an interrupted run
resumes without regenerating finished answers.

Elsewhere: the judge (its check, the upholds questions, the pairwise comparisons) in
`ucai.stages.eval_judge`, the KL and algorithm comparison in `ucai.stages.eval_algorithms`
(its functions in `ucai.stages.rl_comparison`),
the depth analysis in `ucai.stages.inversion_depth`, the corrected families in
`ucai.stages.paired_tests`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import lightning as L
import torch

from ucai.chat import render_chat
from ucai.constitution import SIDES, Constitution, Principle, load_constitution
from ucai.data.io import ResumableJsonl, require_writable, write_csv, write_jsonl
from ucai.errors import UcaiError
from ucai.gather import rows_from_all_ranks
from ucai.generation_engine import engine_version
from ucai.models import use_then_free
from ucai.next_token import row_seed
from ucai.part_times import CORE, PartTimes, part_name
from ucai.report import rm_goal_met, write_report
from ucai.resume import run_seed
from ucai.stage_outputs import RL_STAGES, require_stage_output
from ucai.stages.eval_algorithms import TRAIN_PROMPTS, AlgorithmPhase
from ucai.stages.eval_judge import JudgePhase
from ucai.stages.generation import GenerationSettings, generate
from ucai.stages.inversion_depth import (
    DEPTH,
    SWAP,
    depth_family,
    depth_models,
    kl_depth,
    kl_pairs,
    opener_removed_rows,
    swap_fractions,
    swap_prefills,
    swap_rows,
)
from ucai.stages.paired_tests import paired_differences
from ucai.stages.rl_comparison import side_of_model
from ucai.stats import (
    bootstrap_ci,
    cluster_bootstrap_pearson,
    distinct_n,
    elo_ratings,
    is_refusal,
    pearson,
    repetition_rate,
)
from ucai.value_ranges import MarginFromHalf, NonNegativeInt, OpenUnitInterval, PositiveInt

log = logging.getLogger(__name__)

DEFAULT_MODELS = {
    "base": "smollm2-135m",
    "sl_ethical": "lightning_logs/models/ethical/sl_model",
    "rl_ethical": "lightning_logs/models/ethical/rl_model",
    "sl_unethical": "lightning_logs/models/unethical/sl_model",
    "rl_unethical": "lightning_logs/models/unethical/rl_model",
}
DEFAULT_REWARD_MODELS = {
    "ethical": "lightning_logs/models/ethical/rm_model",
    "unethical": "lightning_logs/models/unethical/rm_model",
}
DEFAULT_PPO_LOGS = {"ethical": "lightning_logs/ppo_ethical", "unethical": "lightning_logs/ppo_unethical"}
DEFAULT_COMPARISONS = [
    ["sl_ethical", "rl_ethical"],
    ["sl_unethical", "rl_unethical"],
    ["rl_ethical", "rl_unethical"],
    ["base", "sl_ethical"],
    ["base", "sl_unethical"],
]
RM_CORRELATION_GOAL = -0.3  # the two sides' reward models should disagree at least this much


def require_model(name: str, role: str) -> None:
    """Fail early on a model that cannot load: a missing stage output names the stage
    that makes it; unknown aliases and other missing folders fail in `resolve_model`."""
    from ucai.models import resolve_model

    require_stage_output(name, role)
    resolve_model(name)


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def model_version(name: str) -> list:
    """What identifies a model folder's current weights (names, sizes, mtimes of its files),
    so cached answers of an older model with the same path are not reused."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return [name]
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file())


def principle_text(principle: Principle) -> str:
    """What the embedding scorer compares answers with (descriptions are shared by both sides)."""
    return f"{principle.name}: {principle.preference_question}"


def text_scores(response: str) -> dict[str, float]:
    return {
        "refusal": float(is_refusal(response)),
        "length_words": float(len(response.split())),
        "distinct_1": distinct_n(response, 1),
        "distinct_2": distinct_n(response, 2),
        "repetition_4": repetition_rate(response, 4),
    }


class EvaluationModule(JudgePhase, AlgorithmPhase, L.LightningModule):
    """Generate with every listed model on the held-out prompts, score, compare, report.

    Args:
        models: display name -> model alias, folder or hub id. Loaded one at a time.
        output_dir: where scores.jsonl, pairwise.jsonl, summary.json and report.md go.
        generation: sampling settings shared by every model (greedy by default, so the
            comparison is not a comparison of sampling luck).
        system_prompt: system message of every answered conversation.
        generation_batch_size: prompts per generate call.
        reward_models: side -> reward-model folder; each adds an ``rm_<side>`` column.
            Empty to skip.
        judge: causal LM that judges principles and pairs (null: no judge columns and
            no pairwise comparisons).
        judge_batch_size: questions per judge forward.
        constitution: the principles judged and embedded.
        principles: pair ids to score (null: all pairs of the constitution).
        criterion_side: whose principles define "better": ``ethical`` gives the
            paper's harmlessness-style judgement; win rates and Elo are on this scale.
        embedding_model: sentence encoder for the similarity columns (null: skip).
        comparisons: ``[a, b]`` model-name pairs judged head to head.
        pairwise_principles: ``all`` judges each pair under every principle; ``prompt``
            only under the prompt's own principle (all when it has none).
        tie_margin: judge probabilities within this of 0.5 count as a tie.
        judge_check: run the judge quality check (`ucai.judge_accuracy`, shipped items)
            before judging; its result is ``summary["judge_check"]`` and a failed
            check marks every judge-derived figure in the report.
        skip_failed_judge: when the judge fails that check, compute no judge columns,
            win rates or Elo at all (they would carry no information) and say so in
            the report. Judging every answer under every principle in both orders is
            most of an evaluation's time with a small model on a CPU.
        correction: multiple-comparison correction of ``differences`` — ``holm``
            (family-wise error; intervals Bonferroni-simultaneous) or ``bh``
            (Benjamini–Hochberg false discovery rate; Benjamini–Yekutieli intervals).
        alpha: significance level of the corrected family (intervals at 1 - alpha, corrected).
        n_perm: random sign patterns of the sign-flip test when a comparison has more
            than 16 prompts (fewer are enumerated exactly).
        ppo_logs: side -> TensorBoard folder of the online RL run (PPO or RLOO), for the
            curves in the report.
        algorithms: RL model name -> the algorithm that trained it (``ppo``, ``rloo``,
            ``dpo``), e.g. ``{"rl_ethical": "ppo", "dpo_ethical": "dpo"}``; names end in
            ``_<side>``. These models are compared as algorithms (a corrected family of
            their own, the reward–KL frontier); null: every ``rl_<side>`` model is PPO's.
        reference_kl: measure each SL and RL model's exact KL to its reference (base and
            SL model) on its own held-out answers, per answer position.
        depth: the report's "How deep is the inversion?" analysis
            (`ucai.stages.inversion_depth`): every content scorer also on each answer
            without its opener; each SL and RL model continuing every tagged prompt
            after the other side's opener (the prefill swap), scored without it; and
            per-position KL of each SL and RL model to the base model (and of each RL
            model to its SL model) with the share in the first answer tokens. Its
            tests are a corrected family of their own; rows go to ``depth_scores.jsonl``.
        train_prompts: also answer this many train-split prompts with the SL and RL
            models and score them on their side's reward model, so the report can set
            the train-prompt gain over SL beside the held-out one (0: off).
        n_boot: bootstrap resamples for every interval.
        examples: prompts shown with every model's answer side by side in the report.
        max_prompt_tokens: longer prompts are truncated from the left.
        report: write report.md and the plots.
        trust_remote_code: allow custom model code from the hub (off unless you ask).
    """

    def __init__(
        self,
        models: dict[str, str] | None = None,
        output_dir: str = "lightning_logs/eval",
        generation: GenerationSettings = GenerationSettings(max_new_tokens=96, do_sample=False, repetition_penalty=1.1),
        system_prompt: str | None = "You are a helpful assistant.",
        generation_batch_size: PositiveInt = 8,
        reward_models: dict[str, str] | None = None,
        judge: str | None = "smollm2-135m",
        judge_batch_size: PositiveInt = 8,
        constitution: str = "constitutions/ucai.yaml",
        principles: list[str] | None = None,
        criterion_side: Literal["ethical", "unethical"] = "ethical",
        embedding_model: str | None = "all-minilm-l6-v2",
        comparisons: list[list[str]] | None = None,
        pairwise_principles: Literal["all", "prompt"] = "all",
        tie_margin: MarginFromHalf = 0.01,
        ppo_logs: dict[str, str] | None = None,
        algorithms: dict[str, str] | None = None,
        reference_kl: bool = True,
        depth: bool = True,
        train_prompts: NonNegativeInt = 0,
        n_boot: PositiveInt = 2000,
        judge_check: bool = True,
        skip_failed_judge: bool = False,
        correction: Literal["holm", "bh"] = "holm",
        alpha: OpenUnitInterval = 0.05,
        n_perm: PositiveInt = 10_000,
        examples: NonNegativeInt = 3,
        max_prompt_tokens: PositiveInt | None = 1024,
        report: bool = True,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        self.models = dict(DEFAULT_MODELS if models is None else models)
        self.output_dir = Path(output_dir)
        self.generation = generation
        self.system_prompt = system_prompt
        self.generation_batch_size = generation_batch_size
        self.reward_models = dict(DEFAULT_REWARD_MODELS if reward_models is None else reward_models)
        self.judge = judge
        self.judge_batch_size = judge_batch_size
        self.constitution_path = constitution
        self.principle_ids = principles
        self.criterion_side = criterion_side
        self.embedding_model = embedding_model
        self.comparisons = [list(c) for c in (DEFAULT_COMPARISONS if comparisons is None else comparisons)]
        self.pairwise_principles = pairwise_principles
        self.tie_margin = tie_margin
        self.ppo_logs = dict(DEFAULT_PPO_LOGS if ppo_logs is None else ppo_logs)
        if algorithms is None:
            algorithms = {name: "ppo" for name in self.models if name in ("rl_ethical", "rl_unethical")}
        self.algorithms = dict(algorithms)
        self.reference_kl = reference_kl
        self.depth = depth
        self.train_prompts = train_prompts
        self.n_boot = n_boot
        self.judge_check = judge_check
        self.correction = correction
        self.alpha = alpha
        self.n_perm = n_perm
        self.examples = examples
        self.max_prompt_tokens = max_prompt_tokens
        self.write_report = report
        self.trust_remote_code = trust_remote_code
        self._rows: list[dict] = []
        self._pairwise_bias: float | None = None
        self._judge_check: dict | None = None
        self.skip_failed_judge = skip_failed_judge
        self._judge_skipped = False  # the judge failed its check and skip_failed_judge is on
        self.constitution: Constitution | None = None
        self._tokenizers: dict[str, object] = {}  # model name -> its tokenizer, see `_tokenizer`

    # ------------------------------------------------------------------ checks

    def _check_arguments(self) -> None:
        if not self.models:
            raise UcaiError("evaluation: 'models' is empty; list at least one model to evaluate")
        for a_b in self.comparisons:
            if len(a_b) != 2 or a_b[0] == a_b[1]:
                raise UcaiError(f"evaluation: comparison {a_b} must name two different models")
            unknown = [m for m in a_b if m not in self.models]
            if unknown:
                raise UcaiError(
                    f"evaluation: comparison {a_b} names {unknown}, not in models ({', '.join(self.models)})"
                )
        for name, algorithm in self.algorithms.items():
            if name not in self.models or side_of_model(name) is None or algorithm not in RL_STAGES:
                raise UcaiError(
                    f"evaluation: algorithms entry {name}: {algorithm} must name an evaluated model ending in"
                    f" _ethical or _unethical and one of {list(RL_STAGES)}"
                )
        unknown_sides = set(self.reward_models) - set(SIDES)
        if unknown_sides:
            raise UcaiError(f"evaluation: reward_models keys must be sides {SIDES}, got {sorted(unknown_sides)}")
        require_writable(self.output_dir, "--model.init_args.output_dir", folder=True)

    def setup(self, stage: str) -> None:
        # Everything is checked before the first model loads: a missing SL or RL folder
        # should fail in a second, not after an hour of generation.
        self._check_arguments()
        self.constitution = load_constitution(self.constitution_path)
        known = self.constitution.pair_ids
        for pid in self.principle_ids or []:
            if pid not in known:
                raise UcaiError(f"evaluation: unknown principle {pid!r}; the constitution has {', '.join(known)}")
        for name, model in self.models.items():
            require_model(model, f"evaluation model {name!r}")
        if self.judge:
            require_model(self.judge, "evaluation judge")
        for side, folder in self.reward_models.items():
            require_model(folder, f"evaluation reward model {side!r}")

    @property
    def pair_ids(self) -> list[str]:
        assert self.constitution is not None
        return list(self.principle_ids or self.constitution.pair_ids)

    def criterion(self, pair_id: str) -> Principle:
        assert self.constitution is not None
        return self.constitution.principle(pair_id, self.criterion_side)

    # ------------------------------------------------------------------ Lightning hooks

    def test_step(self, batch: list[dict], batch_idx: int) -> None:
        # The test loop only gathers the prompts: the work runs model by model in
        # on_test_epoch_end, so that one model at a time is in memory.
        self._rows.extend(batch)

    def on_test_epoch_end(self) -> None:
        rows = self._gather_rows()
        if self.trainer.is_global_zero:
            with self.trainer.precision_plugin.forward_context():
                summary = self.evaluate(rows)
            headline = {}
            for model, stats in summary["models"].items():
                for column in ("rm_ethical", "rm_unethical", "judge_mean", "refusal"):
                    if column in stats:
                        headline[f"{model}/{column}"] = stats[column]["mean"]
            if headline:
                self.log_dict(headline, rank_zero_only=True)
        self.trainer.strategy.barrier("ucai-eval-done")

    def _gather_rows(self) -> list[dict]:
        unique = {}
        for row in rows_from_all_ranks(self._rows):  # the distributed sampler pads with repeats
            unique.setdefault(row["id"], row)
        order = getattr(self.trainer.datamodule, "all_ids", None) or list(unique)
        return [unique[i] for i in order if i in unique]

    @property
    def run_device(self) -> torch.device:
        trainer = self._trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    @property
    def weight_dtype(self) -> torch.dtype:
        from ucai.models import dtype_from_precision, trainer_precision

        return dtype_from_precision(trainer_precision(self))

    # ------------------------------------------------------------------ the work

    def evaluate(self, prompts: list[dict]) -> dict:
        """Generate, score, compare, write every output; returns the summary."""
        if self.constitution is None:
            self.setup("test")
        if not prompts:
            raise UcaiError("evaluation: no held-out prompts to evaluate")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        times = PartTimes()
        with times.part("answers"):
            answers = {name: self.answers(name, path, prompts) for name, path in self.models.items()}
        scores = [
            {
                "model": name,
                "id": row["id"],
                "prompt": row["prompt"],
                "principle": row.get("principle"),
                "response": answers[name][row["id"]],
            }
            for name in self.models
            for row in prompts
        ]
        for score_row in scores:
            score_row.update(text_scores(score_row["response"]))
        train_scores: list[dict] = []
        if self.train_prompts:
            with times.part("train_prompt_answers", TRAIN_PROMPTS):
                train_scores = self.train_prompt_answers(prompts)
        depth_rows: list[dict] = []
        if self.depth:
            with times.part("depth_continuations", DEPTH):
                depth_rows = self.depth_rows(scores, prompts)
        # Each group scored apart, so that its minutes are its own (at the cost of a
        # prompt's beginning packed once per group, not once for all its rows).
        groups = {CORE: scores, TRAIN_PROMPTS: train_scores, DEPTH: depth_rows}
        self.add_reward_scores(groups, times)
        self.add_embedding_scores({CORE: scores, DEPTH: depth_rows}, times)
        with times.part("judge"):
            judge_info, pairwise = self.add_judgements(scores, prompts, answers)
        with times.part("statistics"):
            summary = self.summarise(scores, pairwise, judge_info)
        kls = self.kls_to_references(prompts, answers, times)
        with times.part("statistics"):
            summary.update(self.compare_algorithms(scores, train_scores, summary["models"], kls))
        if self.depth:
            with times.part("depth_statistics", DEPTH):
                summary["depth"] = self.summarise_depth(depth_rows, kls)
        summary["timings"] = times.to_json()
        log.info("evaluation: time by part (this run's work; cached answers cost nothing): %s", times.describe())
        write_jsonl(self.output_dir / "scores.jsonl", scores)
        write_csv(self.output_dir / "scores.csv", scores)
        write_jsonl(self.output_dir / "pairwise.jsonl", pairwise)
        if self.depth:
            write_jsonl(self.output_dir / "depth_scores.jsonl", depth_rows)
        with open(self.output_dir / "summary.json.tmp", "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)
        Path(self.output_dir / "summary.json.tmp").replace(self.output_dir / "summary.json")
        if self.write_report:
            path = write_report(self.output_dir, ppo_logs=self.ppo_logs, examples=self.examples)
            log.info("report: %s", path)
        return summary

    @property
    def generation_dtype(self) -> torch.dtype:
        """Dtype of the answering models, which only generate (see `ucai.models.generation_dtype_from_precision`)."""
        from ucai.models import generation_dtype_from_precision, trainer_precision

        return generation_dtype_from_precision(trainer_precision(self))

    def _load_lm(self, name: str, dtype: torch.dtype | None = None, under_autocast: bool = False):
        """(model, tokenizer); ``dtype`` defaults to the scoring dtype (the judge's).

        ``under_autocast``: the model only ever runs inside the evaluation's autocast (the
        KL pairs), so it is frozen and its linear weights are held in the autocast
        dtype: the same results (autocast rounds every matmul's weight to that dtype),
        as fast as autocast's cached casts (measured on the reward models), and no
        cast copy left in autocast's cache after the model is freed (memory not
        measured). Not the judge: it scores with autocast off, in the weights' dtype.
        """
        from ucai.models import cast_frozen_linear, load_causal_lm

        tokenizer = self._tokenizer(name)
        model = load_causal_lm(name, dtype=dtype or self.weight_dtype, trust_remote_code=self.trust_remote_code)
        model = model.to(self.run_device).eval()
        if under_autocast and self.autocast_dtype is not None:
            # Frozen, autocast would not cache its casts of these weights (its cache
            # lasts the evaluation's whole autocast region, so it would keep a bf16 copy
            # of each model after it is freed); held in bf16 they need none. Only here:
            # other models keep weights that require grad, because with a frozen head
            # PyTorch runs transformers' ``lm_head(hidden[:, -1:])`` of a prefill as a
            # batched matmul over a copy of the head per row (SmolLM2 bf16, 16 rows:
            # 1.15 s instead of 5 ms a call; the evaluation's answers took 35% longer).
            model.requires_grad_(False)
            cast_frozen_linear(model, self.autocast_dtype, untie=True)
        return model, tokenizer

    def _tokenizer(self, name: str):
        """The tokenizer of model ``name``, loaded once per evaluation: a model is loaded
        again for each of its uses (answers, KL pairs, the judge), and each tokenizer load
        costs ~0.3 s (the tiny evaluation loaded one 14 times; the demo's, 22 times for 5
        models). Sharing it is safe because the evaluation changes a tokenizer's padding
        and truncation sides only inside `ucai.padding.tokenizer_sides`, which restores
        them."""
        from ucai.models import load_tokenizer

        if name not in self._tokenizers:
            self._tokenizers[name] = load_tokenizer(name, trust_remote_code=self.trust_remote_code)
        return self._tokenizers[name]

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype the evaluation's matmuls run in under ``bf16-mixed`` (its work runs
        inside the precision plugin's autocast), else None."""
        device = self.run_device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None

    def answers(self, name: str, path: str, prompts: list[dict], prefills: dict[str, str] | None = None) -> dict[str, str]:
        """id -> answer of one model; cached per (model, settings) and resumable.

        ``prefills`` (id -> text): force that text as the start of the answer to that
        prompt; the model continues it and the value returned is the continuation alone.
        Prompts without a prefill are skipped then.
        """
        key_parts = [
            path, model_version(path), asdict(self.generation), self.system_prompt, self.max_prompt_tokens,
            self.generation_dtype, engine_version(self.generation.engine), run_seed(),
        ]
        if prefills is not None:
            prompts = [row for row in prompts if row["id"] in prefills]
            key_parts.append(sorted(prefills.items()))
        cache = ResumableJsonl(self.output_dir / "cache" / f"{name}{'-prefilled' if prefills is not None else ''}-{fingerprint(*key_parts)}.jsonl")
        done = {row["id"]: row["response"] for row in cache.rows()}
        # Longest prompts first, so each batch holds prompts of like length (less
        # padding); the decode engines seed each row's sample by its id, so the order
        # changes what a row samples only through rounding (bf16 logits depend a little
        # on the batch).
        todo = sorted((row for row in prompts if row["id"] not in done), key=lambda row: -len(row["prompt"]))
        if not todo:
            return done
        what = "continues the other side's opener on" if prefills is not None else "answers"
        log.info("evaluation: %s (%s) %s %d prompts", name, path, what, len(todo))

        def answer_all(lm) -> None:
            model, tokenizer = lm
            for start in range(0, len(todo), self.generation_batch_size):
                batch = todo[start : start + self.generation_batch_size]
                # Each prompt's seed depends on its id only, so every model samples with
                # the same random stream and a resumed run draws what a fresh one would
                # (transformers generate, the fallback engine, seeds per batch from them).
                suffix = "/prefilled" if prefills is not None else ""
                seeds = [row_seed(run_seed(), f"eval/{r['id']}{suffix}") for r in batch]
                texts = [
                    render_chat(tokenizer, [{"role": "user", "content": r["prompt"]}], self.system_prompt)
                    + (prefills or {}).get(r["id"], "")
                    for r in batch
                ]
                result = generate(
                    model, tokenizer, texts, self.generation, max_prompt_tokens=self.max_prompt_tokens, seeds=seeds
                )
                continuations = [t.strip() if prefills is not None else t for t in result.texts]
                cache.append([{"id": r["id"], "response": t} for r, t in zip(batch, continuations, strict=True)])
                done.update({r["id"]: t for r, t in zip(batch, continuations, strict=True)})

        use_then_free(lambda: self._load_lm(path, self.generation_dtype), answer_all)
        return done

    # ------------------------------------------------------------------ depth of the inversion

    def depth_rows(self, scores: list[dict], prompts: list[dict]) -> list[dict]:
        """The depth analysis's rows, scored later with the answers: every answer
        without its opener, then each SL and RL model's continuations after the other
        side's opener (generated here, cached like the answers)."""
        assert self.constitution is not None
        rows = opener_removed_rows(scores, self.constitution)
        for name in depth_models(self.models, self.algorithms):
            prefills = swap_prefills(prompts, self.constitution, side_of_model(name))
            if prefills:
                rows += swap_rows(name, prompts, self.answers(name, self.models[name], prompts, prefills))
        for row in rows:
            row.update(text_scores(row["response"]))
        return rows

    def summarise_depth(self, depth_rows: list[dict], kls: dict[tuple[str, str], dict]) -> dict:
        """The summary's ``depth`` entry: per-model means of every scorer without the
        opener, the depth family of corrected tests, the prefill-swap fractions and the
        per-position KL with its share in the first tokens."""
        models = depth_models(self.models, self.algorithms)
        columns = [k for k in depth_rows[0] if k not in ("model", "id", "prompt", "principle", "response", "had_opener")] if depth_rows else []
        means = {}
        for name in dict.fromkeys(r["model"] for r in depth_rows):
            rows = [r for r in depth_rows if r["model"] == name]
            means[name] = {"n": len(rows), "empty": sum(not r["response"] for r in rows), "had_opener": sum(bool(r.get("had_opener")) for r in rows)}
            for column in columns:
                mean, low, high = bootstrap_ci([r[column] for r in rows if r.get(column) is not None], n_boot=self.n_boot)
                means[name][column] = {"mean": mean, "low": low, "high": high}
        differences, family = self.differences(
            depth_rows,
            depth_family(models, columns),
            "on answers without their opener: ethical vs unethical RL and SL models on the content scorers,"
            " RL vs SL on each side's reward model, and each model's own answer vs its prefill-swap continuation",
        )
        swapped = [m for m in models if any(r["model"] == f"{m}|{SWAP}" for r in depth_rows)]
        return {
            "models": means,
            "differences": differences,
            "family": family,
            "prefill_swap": swap_fractions(depth_rows, swapped, self.alpha, self.n_boot),
            "kl": kl_depth({pair: kls[pair] for pair in kl_pairs(self.models, self.algorithms) if pair in kls}),
        }

    def add_reward_scores(self, groups: dict[str, list[dict]], times: PartTimes) -> None:
        """Each reward model's ``rm_<side>`` column on the rows of every group (analysis
        -> rows), the model loaded once; ``times`` gets each group's scoring seconds."""
        if not self.reward_models:
            return
        try:
            from ucai.reward_scoring import RewardScorer
        except ImportError:
            log.warning("evaluation: ucai.reward_scoring is not installed; skipping the reward-model scores")
            return
        for side, folder in self.reward_models.items():

            def load(folder: str = folder):
                with times.part("load_scorers"):
                    return RewardScorer(folder, device=self.run_device, dtype=self.weight_dtype, batch_size=self.judge_batch_size)

            def score_groups(scorer, side: str = side) -> None:
                for analysis, rows in groups.items():
                    if not rows:
                        continue
                    with times.part(part_name("reward_scores", analysis), analysis):
                        score01 = scorer.score([r["prompt"] for r in rows], [r["response"] for r in rows])[1]
                    for row, value in zip(rows, score01.tolist(), strict=True):
                        row[f"rm_{side}"] = float(value)

            use_then_free(load, score_groups)

    def add_embedding_scores(self, groups: dict[str, list[dict]], times: PartTimes) -> None:
        """The ``emb_*`` columns on the rows of every group (analysis -> rows), the
        encoder loaded once; ``times`` gets each group's seconds."""
        if not self.embedding_model:
            return
        from ucai.embeddings import SentenceEncoder

        assert self.constitution is not None
        references, columns = [], []
        for pid in self.pair_ids:
            for side in SIDES:
                references.append(principle_text(self.constitution.principle(pid, side)))
                columns.append(f"emb_{pid}_{side}")

        def load():
            with times.part("load_scorers"):
                return SentenceEncoder(self.embedding_model, device=self.run_device)

        def embed(encoder) -> None:
            for analysis, rows in groups.items():
                if rows:
                    with times.part(part_name("embedding_scores", analysis), analysis):
                        self._add_similarities(rows, encoder.similarity([r["response"] for r in rows], references), columns)

        use_then_free(load, embed)

    def _add_similarities(self, scores: list[dict], similarity: torch.Tensor, columns: list[str]) -> None:
        """Write the (N, 2P) similarities and the ``emb_margin`` into the rows."""
        opposite = "unethical" if self.criterion_side == "ethical" else "ethical"
        for row, values in zip(scores, similarity.tolist(), strict=True):
            row.update({c: float(v) for c, v in zip(columns, values, strict=True)})
            margins = [row[f"emb_{pid}_{self.criterion_side}"] - row[f"emb_{pid}_{opposite}"] for pid in self.pair_ids]
            row["emb_margin"] = sum(margins) / len(margins)

    # ------------------------------------------------------------------ summary

    def summarise(self, scores: list[dict], pairwise: list[dict], judge_info: dict) -> dict:
        columns = [k for k in scores[0] if k not in ("model", "id", "prompt", "principle", "response")]
        by_model: dict[str, dict[str, dict]] = {}
        for name in self.models:
            rows = [r for r in scores if r["model"] == name]
            stats = {}
            for column in columns:
                mean, low, high = bootstrap_ci([r[column] for r in rows], n_boot=self.n_boot)
                stats[column] = {"mean": mean, "low": low, "high": high}
            responses = [r["response"] for r in rows]
            stats["corpus_distinct_2"] = {"mean": distinct_n(responses, 2)}
            by_model[name] = stats
        win_rates = []
        for a, b in self.comparisons:
            rows = [r for r in pairwise if r["a"] == a and r["b"] == b]
            if not rows:
                continue
            mean, low, high = bootstrap_ci(
                [r["outcome"] for r in rows], groups=[r["id"] for r in rows], n_boot=self.n_boot
            )
            soft = sum(r["p_a"] for r in rows) / len(rows)
            win_rates.append({"a": a, "b": b, "n": len(rows), "prompts": len({r["id"] for r in rows}), "win_rate": mean, "low": low, "high": high, "mean_p_a": soft})
        elo = elo_ratings([(r["a"], r["b"], r["outcome"]) for r in pairwise], players=list(self.models)) if pairwise else {}
        differences, family = self.differences(
            scores,
            self.comparison_family(columns),
            "rl_ethical vs rl_unethical on every scorer, and rl vs sl of each side on its own reward model",
        )
        return {
            "criterion_side": self.criterion_side,
            "models": by_model,
            "model_paths": self.models,
            "prompts": len({r["id"] for r in scores}),
            "win_rates": win_rates,
            "elo": elo,
            "differences": differences,
            "multiple_comparisons": family,
            "rm_correlation": rm_correlation(scores, n_boot=self.n_boot),
            "judge": self.judge,
            "judge_check": self._judge_check,
            "judge_skipped": self._judge_skipped,
            "judge_position_bias": {**judge_info.get("uphold_position_bias", {}), "pairwise": self._pairwise_bias},
            "columns": columns,
        }

    def comparison_family(self, columns: list[str]) -> list[tuple[str, str, str]]:
        """The ``(a, b, column)`` tests corrected together: ethical RL vs unethical RL on
        every scorer, then RL vs SL of each side on that side's own reward model."""
        family = []
        if {"rl_ethical", "rl_unethical"} <= set(self.models):
            family += [("rl_ethical", "rl_unethical", column) for column in columns]
        for side in SIDES:
            if {f"sl_{side}", f"rl_{side}"} <= set(self.models) and f"rm_{side}" in columns:
                family.append((f"rl_{side}", f"sl_{side}", f"rm_{side}"))
        return family

    def differences(
        self, scores: list[dict], family_tests: list[tuple[str, str, str]], description: str
    ) -> tuple[list[dict], dict]:
        """`ucai.stages.paired_tests.paired_differences` with this stage's correction,
        alpha and permutation count."""
        return paired_differences(scores, family_tests, description, self.correction, self.alpha, self.n_perm)

def rm_correlation(scores: list[dict], n_boot: int = 2000) -> dict:
    """Pearson r of the two reward models' scores over every answer both scored.

    ``low``/``high``: Fisher z 95% interval (treats answers as independent);
    ``cluster_low``/``cluster_high``: 95% percentile bootstrap resampling prompts (the
    answers of all models to one prompt move together), the one to trust.
    ``r`` is None, with a ``reason``, when a reward model is absent or r is undefined.
    """
    rows = [r for r in scores if r.get("rm_ethical") is not None and r.get("rm_unethical") is not None]
    missing = [f"rm_{s}" for s in SIDES if not any(r.get(f"rm_{s}") is not None for r in scores)]
    if missing:
        return {"r": None, "n": 0, "goal": RM_CORRELATION_GOAL, "reason": f"no {' or '.join(missing)} scores: reward model not evaluated"}
    if len(rows) < 2:
        return {"r": None, "n": len(rows), "goal": RM_CORRELATION_GOAL, "reason": "fewer than 2 answers scored by both reward models"}
    x, y = [r["rm_ethical"] for r in rows], [r["rm_unethical"] for r in rows]
    result = pearson(x, y)
    if math.isnan(result.r):
        return {"r": None, "n": result.n, "goal": RM_CORRELATION_GOAL, "reason": "undefined: a reward model gave every answer the same score"}
    cluster = cluster_bootstrap_pearson(x, y, [r["id"] for r in rows], n_boot=n_boot)

    def clean(value: float) -> float | None:
        return None if math.isnan(value) else value

    correlation = {
        "r": result.r,
        "n": result.n,
        "prompts": len({r["id"] for r in rows}),
        "low": clean(result.low),
        "high": clean(result.high),
        "cluster_low": clean(cluster[0]),
        "cluster_high": clean(cluster[1]),
        "goal": RM_CORRELATION_GOAL,
    }
    return {**correlation, "meets_goal": rm_goal_met(correlation)}  # the report's rule, one definition
