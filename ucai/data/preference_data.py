"""Preference pairs for reward-model training, and prompt/response rows for scoring.

`PreferenceDataModule` reads

* ucai preference files (``prompt``, ``chosen``, ``rejected``, optional ``p_chosen``,
  which defaults to 1.0 — a hard label), written by the preference stage;
* Anthropic hh-rlhf files (``chosen``/``rejected`` transcripts, ``.jsonl`` or
  ``.jsonl.gz``, local or a hub dataset file ``hf://datasets/OWNER/NAME/PATH``): the
  turns both transcripts share are the conversation, the final assistant reply of each
  is the response.

`split_pairs` holds pairs out by a hash of their ids: the validation split here, and
the held-out human pairs ``benchmarks/rm_hh.py`` scores (`heldout_pairs`).

Each side of each pair is rendered with the reward backbone's chat template (plain
transcript text for encoders, see `ucai.reward_scoring.render_for_reward`) and
tokenised ONCE in ``setup``. Batches hold pairs of similar length (length-sorted
buckets), which removes most of the padding a random batch carries; the buckets are
fixed, the order of the batches is shuffled each epoch from ``seed + epoch`` by
`ucai.resume.ShardSampler`, which shards the batches between DDP ranks, and the
training loader's position is checkpointed (`ucai.resume.ResumableLoader`), so a run
resumed mid-epoch sees exactly the batches the uninterrupted run would have.

`ResponseDataModule` reads prompt/response rows for ``ucai predict`` scoring.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ucai.chat import DEFAULT_SYSTEM_PROMPT
from ucai.data.io import read_jsonl
from ucai.data.prompt_datamodule import RowDataset, collate_rows, is_heldout
from ucai.data.prompts import parse_transcript
from ucai.errors import UcaiError, located
from ucai.resume import ResumableLoader, ShardSampler, own_generator
from ucai.reward_scoring import has_chat_template, render_for_reward, tokenize_for_reward_lists
from ucai.value_ranges import FractionBelowOne, NonNegativeInt, PositiveInt

log = logging.getLogger(__name__)

# Salt of the validation split of pairs (see `split_pairs`).
VAL_SALT = "validation"
# The share of an hh-rlhf file benchmarks/rm_hh.py scores (`heldout_pairs`); preference
# pre-training validates on the same pairs, so it never trains on them.
BENCHMARK_FRACTION = 0.25

MADE_BY = "the preference stage (ucai predict --config configs/preferences_<side>.yaml)"


@dataclass
class PreferencePair:
    """One preference: ``conversation`` (messages ending with a user turn) and two replies."""

    id: str
    conversation: list[dict[str, str]]
    chosen: str
    rejected: str
    p_chosen: float = 1.0


def _pair_id(chosen: str, rejected: str) -> str:
    return "hh-" + hashlib.sha1(f"{chosen}\0{rejected}".encode()).hexdigest()[:12]


def _string(path, line, row, key) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise located(path, line, f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _from_transcripts(path, line, chosen: str, rejected: str) -> PreferencePair | None:
    """Split two hh-rlhf transcripts into the shared conversation and the two final replies.

    Returns None (the caller counts it) when the transcripts do not end in an
    assistant turn or differ before their final replies.
    """
    c, r = parse_transcript(chosen), parse_transcript(rejected)
    if not c or not r or c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
        return None
    if c[:-1] != r[:-1] or not c[:-1] or c[-2]["role"] != "user":
        return None
    return PreferencePair(_pair_id(chosen, rejected), c[:-1], c[-1]["content"], r[-1]["content"])


# A file in a hub dataset repository, as Hugging Face's own file system names it:
# hf://datasets/OWNER/NAME[@REVISION]/PATH, e.g. hf://datasets/Anthropic/hh-rlhf/harmless-base/train.jsonl.gz
HUB_PREFIX = "hf://datasets/"


def hub_file(path: str | Path) -> tuple[str, str | None, str] | None:
    """(repo id, revision or None, file path in the repo) of a ``hf://datasets/`` name;
    None for a local path; a `UcaiError` for a hub name without all three parts."""
    text = str(path)
    if not text.startswith(HUB_PREFIX):
        return None
    parts = text.removeprefix(HUB_PREFIX).split("/", 2)
    if len(parts) < 3 or not all(parts):
        raise UcaiError(f"{text}: a hub dataset file is {HUB_PREFIX}OWNER/NAME[@REVISION]/PATH/IN/REPO.jsonl.gz")
    name, _, revision = parts[1].partition("@")
    return f"{parts[0]}/{name}", revision or None, parts[2]


def preference_source(path: str | Path) -> Path:
    """The local file of a preference file name: the path itself, or a hub dataset
    file (`hub_file`) downloaded into the Hugging Face cache. A local path that does
    not exist is one `UcaiError`."""
    hub = hub_file(path)
    if hub is not None:
        from huggingface_hub import hf_hub_download

        repo_id, revision, filename = hub
        try:
            return Path(hf_hub_download(repo_id, filename, repo_type="dataset", revision=revision))
        except Exception as error:  # offline, no such repo or file: one line either way
            raise UcaiError(f"{path}: could not fetch it from the hub ({type(error).__name__}: {error})") from None
    path = Path(path).expanduser()
    if not path.exists():
        raise UcaiError(
            f"{path}: preference file not found; it is made by {MADE_BY}, or give an hh-rlhf-format "
            f".jsonl/.jsonl.gz file or a hub dataset file {HUB_PREFIX}OWNER/NAME/PATH"
        )
    return path


def read_preferences(path: str | Path, limit: int | None = None) -> list[PreferencePair]:
    """Read a ucai preference file or an hh-rlhf file (detected per line); a
    ``hf://datasets/`` name is fetched from the hub first (`preference_source`).

    Pairs whose two responses are identical carry no preference and are dropped, as
    are hh-rlhf rows whose transcripts differ before the last reply; both are counted
    in the log. A bad line is one `UcaiError` naming file and line.
    """
    path = preference_source(path)
    pairs: list[PreferencePair] = []
    skipped = {"identical responses": 0, "transcripts differ before the last reply": 0}
    seen: set[str] = set()
    for line, row in read_jsonl(path):
        if "chosen" not in row or "rejected" not in row:
            raise located(path, line, "missing field(s) 'chosen' and/or 'rejected'")
        chosen, rejected = _string(path, line, row, "chosen"), _string(path, line, row, "rejected")
        if "prompt" in row:
            prompt = row["prompt"]
            if isinstance(prompt, str):
                conversation = [{"role": "user", "content": prompt}]
            elif isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
                conversation = [{"role": m["role"], "content": m["content"]} for m in prompt]
            else:
                raise located(path, line, "field 'prompt' must be a string or a list of chat messages")
            p = row.get("p_chosen", 1.0)
            if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
                raise located(path, line, f"field 'p_chosen' must be a number in [0, 1], got {p!r}")
            pair = PreferencePair(str(row.get("id", f"line-{line}")), conversation, chosen, rejected, float(p))
        else:
            pair = _from_transcripts(path, line, chosen, rejected)
            if pair is None:
                skipped["transcripts differ before the last reply"] += 1
                continue
        if pair.chosen.strip() == pair.rejected.strip():
            skipped["identical responses"] += 1
            continue
        if pair.id in seen:
            pair.id = f"{pair.id}-line-{line}"
        seen.add(pair.id)
        pairs.append(pair)
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise UcaiError(f"{path}: no usable preference pairs")
    if any(skipped.values()):
        log.info("%s: skipped %s", path, ", ".join(f"{n} with {why}" for why, n in skipped.items() if n))
    return pairs


def split_pairs(
    pairs: list[PreferencePair], fraction: float, seed: int = 0
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(training, held-out) pairs, held out by a hash of each pair's id (file order
    kept): the rule of `PreferenceDataModule` with ``val_fraction``, and of
    ``benchmarks/rm_hh.py``, so a reward model trained on a file with the same fraction
    and seed never sees the pairs the benchmark scores it on.

    Salted (`VAL_SALT`): the pipeline's pairs come from the prompts' train split, drawn
    by the same unsalted hash, so an unsalted split of the same fraction or less would
    be empty.
    """
    held = [is_heldout(p.id, fraction, seed, salt=VAL_SALT) for p in pairs]
    train = [p for p, h in zip(pairs, held, strict=True) if not h]
    return train, [p for p, h in zip(pairs, held, strict=True) if h]


def heldout_pairs(pairs: list[PreferencePair], fraction: float, seed: int = 0) -> list[PreferencePair]:
    """The pairs `split_pairs` holds out (about ``fraction`` of them, the same ones
    on every run and in any file order)."""
    return split_pairs(pairs, fraction, seed)[1]


class _Batches(Dataset):
    """A dataset whose items are whole, already-padded batches (see the module docstring)."""

    def __init__(self, batches: list[list[int]], collate):
        self.batches = batches
        self.collate = collate

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.collate(self.batches[index])


def length_buckets(lengths: list[int], batch_size: int, seed: int, bucket_batches: int = 50) -> list[list[int]]:
    """Group indices into batches of similar length.

    The indices are shuffled, cut into chunks of ``bucket_batches`` batches, each chunk
    sorted by length and cut into batches: batches are nearly pad-free but still drawn
    from the whole file rather than all short ones first.
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    chunk = max(batch_size * bucket_batches, batch_size)
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    return batches


class PreferenceDataModule(L.LightningDataModule):
    """Tokenised preference pairs for `ucai.stages.reward.RewardModule`.

    Args:
        path: preference JSONL (from the preference stage) or an hh-rlhf file.
        tokenizer: model whose tokenizer and chat template render the texts; null uses
            the reward module's ``model``.
        system_prompt: system message of the rendered conversations (chat templates only).
        max_length: tokens per text; longer texts keep their end, where the response is
            (both texts of a pair lose the same conversation tokens, `truncate_pair`).
        batch_size: pairs per batch (the model sees 2 × batch_size sequences).
        val_fraction: share of pairs held out for validation, chosen by a hash of the id.
        val_size: if set, the LAST ``val_size`` pairs of the file are the validation set
            instead (a fixed split, e.g. 2,000 train / 312 test on hh-rlhf test files).
        limit: read at most this many pairs.
        bucket_batches: batches per length-sorting bucket (1 disables sorting).
        pad_to_multiple_of: batch widths are rounded up to a multiple of this (1: no
            rounding); null (the default): 32 under a 16-bit precision on CPU, where
            resident memory grows with every new batch width and levels off once
            widths repeat, so a few widths are worth a little padding, and 8 elsewhere
            (`width_multiple`; on the CPU experiment's fp32 reward pairs, 3% of the
            tokens are padding at 8 against 10% at 32).
        share_prefix: also give each batch every pair packed into ONE row, the shared
            conversation once and then both replies, so that a decoder runs the
            conversation once per pair (`ucai.reward_scoring.packed_pair_rewards`,
            exact); batches are then bucketed by packed length and hold fewer tokens
            than two sequences per pair (compared in ``benchmarks/reward.py``).
            Encoders and flash-attention models fall back to the two sequences, which
            every batch holds as well.
        seed: seed of the bucket shuffling and, with the epoch, of the batch order.
        num_workers: DataLoader workers (batches are pre-tokenised; 0 is usually right).
        cross_path: the OTHER constitution's preference file (null: none). Its pairs,
            all of them, are rendered like this side's and served by
            `cross_dataloader`; the reward stage reports its accuracy on them after
            training (`RewardStats.cross_accuracy`), never trains on them.
    """

    def __init__(
        self,
        path: str = "lightning_logs/data/ethical/preferences.jsonl",
        tokenizer: str | None = None,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        max_length: PositiveInt = 512,
        batch_size: PositiveInt = 4,
        val_fraction: FractionBelowOne = 0.1,
        val_size: NonNegativeInt | None = None,
        limit: PositiveInt | None = None,
        bucket_batches: PositiveInt = 50,
        pad_to_multiple_of: PositiveInt | None = None,
        share_prefix: bool = True,
        seed: int = 0,
        num_workers: NonNegativeInt = 0,
        cross_path: str | None = None,
    ):
        super().__init__()
        self.path = path
        self.tokenizer_name = tokenizer
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.val_size = val_size
        self.limit = limit
        self.bucket_batches = bucket_batches
        self.pad_to_multiple_of = pad_to_multiple_of
        self.share_prefix = share_prefix
        self.seed = seed
        self.num_workers = num_workers
        self.cross_path = cross_path
        self.tokenizer = None
        self.train_pairs: list[PreferencePair] = []
        self.val_pairs: list[PreferencePair] = []
        self.cross_pairs: list[PreferencePair] = []
        self._encoded: dict[str, list[dict]] = {}

    # ----------------------------------------------------------------- loading

    def _model_name(self) -> str:
        if self.tokenizer_name:
            return self.tokenizer_name
        module = getattr(getattr(self, "trainer", None), "lightning_module", None)
        name = getattr(module, "model_name", None)
        if not name:
            raise UcaiError("PreferenceDataModule needs data.init_args.tokenizer or a model with model_name")
        return name

    def split(self, pairs: list[PreferencePair]) -> tuple[list[PreferencePair], list[PreferencePair]]:
        if self.val_size is not None:
            if not 0 <= self.val_size < len(pairs):
                raise UcaiError(f"{self.path}: val_size {self.val_size} leaves no training pairs of {len(pairs)}")
            cut = len(pairs) - self.val_size
            return pairs[:cut], pairs[cut:]
        train, val = split_pairs(pairs, self.val_fraction, self.seed)
        if not train:
            raise UcaiError(f"{self.path}: val_fraction {self.val_fraction} leaves no training pairs")
        return train, val

    def encode(self, pairs: list[PreferencePair]) -> list[dict]:
        """Token ids of both sides of each pair (lists, unpadded).

        Chat-template texts of a pair that does not fit lose the same number of tokens
        from the start of their shared conversation (`truncate_pair`), so the two
        still share a prefix and are judged on the same context. Encoder texts are
        truncated one by one by the tokenizer, which keeps their [CLS] and [SEP].
        """
        texts = []
        for pair in pairs:
            texts.append(render_for_reward(self.tokenizer, pair.conversation, pair.chosen, self.system_prompt))
            texts.append(render_for_reward(self.tokenizer, pair.conversation, pair.rejected, self.system_prompt))
        by_pair = has_chat_template(self.tokenizer)
        ids = tokenize_for_reward_lists(self.tokenizer, texts, None if by_pair else self.max_length)
        rows = []
        for i, pair in enumerate(pairs):
            chosen, rejected = ids[2 * i], ids[2 * i + 1]
            if by_pair:
                chosen, rejected = truncate_pair(chosen, rejected, self.max_length)
            rows.append(
                {
                    "chosen": chosen,
                    "rejected": rejected,
                    "p_chosen": pair.p_chosen,
                    "shared": shared_prefix_length(chosen, rejected),
                }
            )
        return rows

    def setup(self, stage: str | None = None) -> None:
        if not self._encoded:
            self._read_and_encode()
        if not self._encoded["val"] and self.trainer is not None:
            # No validation pairs: the fit loop runs no validation and asks for no loader
            # (an empty one would be reported as a mistake).
            self.trainer.limit_val_batches = 0

    def _read_and_encode(self) -> None:
        from ucai.models import load_tokenizer

        self.tokenizer = load_tokenizer(self._model_name(), padding_side="right")
        self.train_pairs, self.val_pairs = self.split(read_preferences(self.path, self.limit))
        self._encoded = {"train": self.encode(self.train_pairs), "val": self.encode(self.val_pairs)}
        if self.cross_path is not None:
            self.cross_pairs = read_preferences(self.cross_path)
            self._encoded["cross"] = self.encode(self.cross_pairs)
            log.info("%d cross pairs (the other side's) from %s", len(self.cross_pairs), self.cross_path)
        lengths = [len(r["chosen"]) + len(r["rejected"]) for r in self._encoded["train"]]
        log.info(
            "%d training and %d validation pairs from %s (mean %.0f tokens per pair)",
            len(self.train_pairs), len(self.val_pairs), self.path, sum(lengths) / max(len(lengths), 1),
        )

    # ----------------------------------------------------------------- batches

    def width_multiple(self) -> int:
        """What batch widths are rounded up to: ``pad_to_multiple_of``, or by default 32
        on a CPU trainer with a 16-bit precision (bounded memory, see the class) and 8
        everywhere else (a GPU's tensor cores, fp32 on CPU, no trainer)."""
        if self.pad_to_multiple_of is not None:
            return self.pad_to_multiple_of
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.strategy.root_device.type == "cpu":
            if str(trainer.precision).startswith(("bf16", "16")):
                return 32
        return 8

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """One batch of B pairs.

        Always: ``input_ids``/``attention_mask`` (2B, T) right-padded, chosen rows
        first, then rejected; ``p_chosen`` (B,). With ``share_prefix``: ``pair_ids``
        (B, L) right-padded rows ``[shared prefix | chosen rest | rejected rest]`` and
        ``pair_segments`` (B, 3) the lengths of those three parts.
        """
        pad = self.tokenizer.pad_token_id
        sequences = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
        multiple = self.width_multiple()
        input_ids, mask = pad_batch(sequences, pad, "right", multiple)
        batch = {"input_ids": input_ids, "attention_mask": mask}
        batch["p_chosen"] = torch.tensor([r["p_chosen"] for r in rows], dtype=torch.float32)
        if self.share_prefix:
            packed = [r["chosen"] + r["rejected"][r["shared"] :] for r in rows]
            batch["pair_ids"], _ = pad_batch(packed, pad, "right", multiple)
            batch["pair_segments"] = torch.tensor(
                [[r["shared"], len(r["chosen"]) - r["shared"], len(r["rejected"]) - r["shared"]] for r in rows],
                dtype=torch.long,
            )
        return batch

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        rows = self._encoded[split]
        if self.share_prefix:  # the width of a packed row
            lengths = [len(r["chosen"]) + len(r["rejected"]) - r["shared"] for r in rows]
        else:
            lengths = [max(len(r["chosen"]), len(r["rejected"])) for r in rows]
        if shuffle:
            index_batches = length_buckets(lengths, self.batch_size, self.seed, self.bucket_batches)
        else:  # evaluation: fully sorted, the fewest pad tokens
            order = sorted(range(len(rows)), key=lambda i: lengths[i])
            index_batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        dataset = _Batches(index_batches, lambda idx: self.collate([rows[i] for i in idx]))
        if not shuffle:
            return DataLoader(
                dataset, batch_size=None, shuffle=False, num_workers=self.num_workers, generator=own_generator()
            )
        sampler = ShardSampler.for_trainer(dataset, self.trainer, seed=self.seed)
        return ResumableLoader(dataset, sampler, batch_size=None, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        """This rank's share of the batches, resumable mid-epoch (`ResumableLoader`)."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def stats_dataloader(self) -> DataLoader:
        """Training pairs in a fixed order, for the reward mean/std after training."""
        return self._loader("train", shuffle=False)

    def cross_dataloader(self) -> DataLoader | None:
        """The other side's pairs (``cross_path``) in a fixed order; None without them."""
        return self._loader("cross", shuffle=False) if "cross" in self._encoded else None


def shared_prefix_length(chosen: list[int], rejected: list[int]) -> int:
    """Tokens the two sequences share at the start, leaving each at least one of its own."""
    limit = min(len(chosen), len(rejected)) - 1
    n = 0
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    return n


def pad_batch(
    sequences: list[list[int]], pad_id: int, side: str, multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) ids and 0/1 mask of N token lists padded on ``side``; T is the longest
    length rounded up to a multiple of ``multiple``."""
    width = -(-max(len(s) for s in sequences) // multiple) * multiple
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[i, span] = torch.tensor(seq, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def truncate_pair(chosen: list[int], rejected: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Both sides of a pair cut to at most ``max_length`` tokens, keeping their ends.

    The cut comes off the start of the conversation the two share, by the same number
    of tokens for both, so they keep a common prefix (packed rows stay short) and are
    judged on the same context. Only a reply longer than the budget on its own cuts
    into the reply itself (each side then keeps its last ``max_length`` tokens).
    """
    excess = max(len(chosen), len(rejected)) - max_length
    if excess <= 0:
        return chosen, rejected
    cut = min(excess, shared_prefix_length(chosen, rejected))
    return chosen[cut:][-max_length:], rejected[cut:][-max_length:]


# --------------------------------------------------------------------------- scoring data


class ResponseDataModule(L.LightningDataModule):
    """Prompt/response rows to score (``ucai predict --config configs/reward_score.yaml``).

    Any JSONL with ``prompt`` and a response column works: answers, SL data
    (``response``), rollouts, evaluation files. Batches are lists of row dicts.

    Args:
        path: the JSONL file.
        response_field: the column holding the response.
        limit: score at most this many rows.
        batch_size: rows per batch.
    """

    def __init__(
        self, path: str, response_field: str = "response", limit: PositiveInt | None = None, batch_size: PositiveInt = 16
    ):
        super().__init__()
        self.path = path
        self.response_field = response_field
        self.limit = limit
        self.batch_size = batch_size
        self._rows: list[dict] | None = None
        self._skip: set = set()

    def load(self) -> list[dict]:
        if self._rows is None:
            rows = []
            for line, row in read_jsonl(self.path, required=("prompt", self.response_field)):
                for key in ("prompt", self.response_field):
                    _string(self.path, line, row, key)
                row_id = row.get("id")
                if row_id is None:
                    digest = hashlib.sha1(f"{row['prompt']}\0{row[self.response_field]}".encode()).hexdigest()[:12]
                    row_id = f"r-{digest}-{line}"
                rows.append({**row, "id": row_id, "response": row[self.response_field]})
                if self.limit is not None and len(rows) >= self.limit:
                    break
            if not rows:
                raise UcaiError(f"{self.path}: file is empty")
            self._rows = rows
        return self._rows

    @property
    def all_ids(self) -> list:
        return [r["id"] for r in self.load()]

    def skip_ids(self, ids) -> None:
        self._skip = set(ids)

    def setup(self, stage: str | None = None) -> None:
        self.load()

    def predict_dataloader(self) -> DataLoader:
        rows = [r for r in self.load() if r["id"] not in self._skip]
        return DataLoader(RowDataset(rows), batch_size=self.batch_size, shuffle=False, collate_fn=collate_rows)
