"""The evaluation's comparison of RL algorithms (`ucai.stages.evaluation.EvaluationModule`,
``algorithms:``): each SL and RL model's exact KL to its reference on its own held-out
answers (and, for the depth analysis, to the base model and its side's SL model), the
SL and RL models' answers to train-split prompts, and the summary's algorithm entries:
the corrected family of RL-vs-SL and ethical-vs-unethical differences, the reward–KL
frontier and train vs held-out gains (the functions in `ucai.stages.rl_comparison`).

`AlgorithmPhase` is a mixin of `EvaluationModule` and reads its settings (``models``,
``algorithms``, ``reference_kl``, ``depth``, ``train_prompts``, ``system_prompt``,
``judge_batch_size``, ``n_boot``), loads models with its ``_load_lm``, answers with its
``answers`` and tests with its ``differences``.
"""

from __future__ import annotations

import logging

from ucai.chat import render_chat
from ucai.errors import UcaiError
from ucai.models import use_then_free
from ucai.part_times import CORE, PartTimes, part_name
from ucai.stages.inversion_depth import DEPTH, kl_pairs
from ucai.stages.rl_comparison import (
    algorithm_family,
    answer_kl,
    frontier_points,
    gain_on_prompts,
    kl_summary,
    reference_of,
    side_of_model,
)

log = logging.getLogger(__name__)

TRAIN_PROMPTS = "train_prompts"  # the optional analysis whose minutes are reported apart (`PartTimes`)


class AlgorithmPhase:
    """The RL-algorithm comparison of `EvaluationModule` (see the module docstring)."""

    def train_prompt_answers(self, heldout: list[dict]) -> list[dict]:
        """Score rows of the SL and RL models on ``train_prompts`` prompts of the train
        split (the first in file order), for the train-prompt vs held-out gains."""
        if not self.train_prompts:
            return []
        rows = self._train_split_rows(heldout)[: self.train_prompts]
        names = [n for n in self.models if n in self.algorithms or (n.startswith("sl_") and side_of_model(n))]
        out = []
        for name in names:
            answered = self.answers(name, self.models[name], rows)  # shares the held-out cache: ids differ
            out += [
                {"model": name, "id": r["id"], "prompt": r["prompt"], "principle": r.get("principle"), "response": answered[r["id"]]}
                for r in rows
            ]
        return out

    def _train_split_rows(self, heldout: list[dict]) -> list[dict]:
        """The train split of the evaluated prompt file, with the held-out split's settings."""
        from ucai.data.prompt_datamodule import PromptDataModule

        data = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if not isinstance(data, PromptDataModule):
            raise UcaiError("evaluation: train_prompts needs the prompts from a PromptDataModule (data.class_path)")
        train = PromptDataModule(
            path=data.path,
            principles=data.principles,
            split="train",
            heldout_fraction=data.heldout_fraction,
            split_seed=data.split_seed,
            empty=data.empty,
            max_chars=data.max_chars,
        )
        heldout_ids = {r["id"] for r in heldout}
        return [r for r in train.rows() if r["id"] not in heldout_ids]

    def kls_to_references(
        self, prompts: list[dict], answers: dict[str, dict[str, str]], times: PartTimes
    ) -> dict[tuple[str, str], dict]:
        """(model, reference) -> the model's KL to that reference on its own held-out
        answers (`ucai.stages.rl_comparison.kl_summary`), two models in memory at a
        time: each SL and RL model to its reference (``reference_kl``) and, for the
        depth analysis, each to the base model and each RL model to its SL model.
        ``times`` gets each pair's seconds under ``kl`` or, for pairs only the depth
        analysis asks for, ``kl_depth_analysis``."""
        pairs = []
        if self.reference_kl:
            pairs += [(n, r) for n in self.models if (r := reference_of(n, self.algorithms, self.models)) is not None]
        wanted_by = dict.fromkeys(pairs, CORE)
        if self.depth:
            depth_only = [pair for pair in kl_pairs(self.models, self.algorithms) if pair not in pairs]
            pairs += depth_only
            wanted_by.update(dict.fromkeys(depth_only, DEPTH))
        kls: dict[tuple[str, str], dict] = {}
        for name, reference in pairs:
            model_answers = [answers[name][r["id"]] for r in prompts]

            def measure(pair, reference=reference, model_answers=model_answers) -> list[list[float]]:
                (model, tokenizer), (reference_model, _) = pair
                rendered = [render_chat(tokenizer, [{"role": "user", "content": r["prompt"]}], self.system_prompt) for r in prompts]
                return answer_kl(model, reference_model, tokenizer, rendered, model_answers, self.judge_batch_size)

            def load_pair(name=name, reference=reference):
                return (
                    self._load_lm(self.models[name], under_autocast=True),
                    self._load_lm(self.models[reference], under_autocast=True),
                )

            log.info("evaluation: KL of %s to %s on its answers", name, reference)
            analysis = wanted_by[(name, reference)]
            with times.part(part_name("kl", analysis), analysis):
                kls[(name, reference)] = kl_summary(use_then_free(load_pair, measure), reference, self.n_boot)
        return kls

    def compare_algorithms(
        self, scores: list[dict], train_scores: list[dict], model_stats: dict, all_kls: dict[tuple[str, str], dict]
    ) -> dict:
        """The summary's RL-algorithm entries: KL to the reference, the algorithm family
        of corrected tests, the reward–KL frontier and train vs held-out gains."""
        kls = {}
        if self.reference_kl:
            for name in self.models:
                reference = reference_of(name, self.algorithms, self.models)
                if (name, reference) in all_kls:
                    kls[name] = all_kls[(name, reference)]
        columns = [k for k in scores[0] if k.startswith("rm_")]
        # A test of the primary family (rl_<side> vs sl_<side>, rl_ethical vs
        # rl_unethical) stays there alone: corrected twice, it had two verdicts.
        primary = set(self.comparison_family(columns))
        differences, family = self.differences(
            scores,
            [test for test in algorithm_family(self.models, self.algorithms, columns) if test not in primary],
            "each RL model vs its side's SL model on that side's reward model, each algorithm's ethical"
            " vs unethical model on both reward models, and the algorithms of one side against each other on"
            " that side's reward model (tests of the primary family are corrected there only)",
        )
        gains = {}  # only with train-prompt answers: the held-out gain alone is in the family
        for name in self.algorithms if train_scores else ():
            side = side_of_model(name)
            column, sl = f"rm_{side}", f"sl_{side}"
            gains[name] = {
                "heldout": gain_on_prompts(scores, name, sl, column, self.n_boot),
                "train": gain_on_prompts(train_scores, name, sl, column, self.n_boot),
            }
        return {
            "algorithms": self.algorithms,
            "reference_kl": kls,
            "algorithm_differences": differences,
            "algorithm_family": family,
            "frontier": frontier_points(model_stats, kls, self.algorithms),
            "train_vs_heldout": gains,
        }
