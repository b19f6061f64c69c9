"""Generation engines: Hugging Face ``generate`` and ucai's lean decode loop.

Every generating stage calls `ucai.stages.generation.generate`, which hands the
tokenised batch to an engine picked by `select_engine`. An engine is one small
interface (`GenerationEngine`): ``unsupported(model)`` says why it cannot run a model
(None when it can), and ``generate(...)`` returns the (B, P + T) ids that HF
``generate`` would return. Two ship here:

* ``hf`` — ``model.generate`` (any architecture, FSDP with ``synced_gpus``).
* ``decode_loop`` — for Llama-family decoders (Llama, Mistral, Qwen2; SmolLM2 is a
  Llama). Prefill runs through the model's own forward; each decode step then runs the
  layers directly on a preallocated KV cache, attending only to the filled part, with
  masks and positions built once, and with the q/k/v and gate/up projections fused
  into one matmul each on CPU where the weights need a bf16 copy anyway (packed for
  oneDNN, or cast once for autocast; small matmuls there are dominated by per-call
  overhead). The layer pieces are the model's own modules and functions (norms,
  rotary embedding, its attention function), so greedy decoding is token-identical to
  ``generate``; sampling applies the same logits processors in the same order.

``register_engine`` adds another engine under a name (a vLLM backend for GPU users
would plug in here); ``GenerationSettings.engine`` picks one, and ``auto`` uses the
decode loop where it applies and falls back to ``hf`` with one log line otherwise.
"""

from __future__ import annotations

import logging
import sys
import time
import weakref
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ucai.hardware import cpu_bf16_is_native
from ucai.padding import position_ids

log = logging.getLogger(__name__)

# Generation-config fields that would add logits processors the decode loop does not
# apply; a model whose generation config sets one falls back to `generate`.
_UNSUPPORTED_PROCESSORS = {
    "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "sequence_bias": (None,),
    "encoder_repetition_penalty": (None, 1.0),
    "renormalize_logits": (None, False),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "min_p": (None,),
    "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
    "num_beams": (None, 1),
}
_DECODER_TYPES = ("llama", "mistral", "qwen2")
_ATTENTION = ("sdpa", "eager")


class GenerationEngine(Protocol):
    """What `ucai.stages.generation.generate` needs from an engine."""

    name: str

    def unsupported(self, model) -> str | None:
        """Why this engine cannot generate with ``model`` (None: it can)."""

    def generate(
        self,
        model,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        settings,
        stop_ids: list[int],
        pad_id: int,
        synced_gpus: bool = False,
    ) -> torch.Tensor:
        """(B, P + T) prompt ids (left-padded, as given) followed by the completions;
        rows that stopped are padded with ``pad_id`` after their stop token, and T is
        the longest completion (at most ``settings.max_new_tokens``)."""


class HFGenerate:
    """``model.generate``: every architecture and strategy transformers supports."""

    name = "hf"

    def unsupported(self, model) -> str | None:
        return None

    def generate(self, model, input_ids, attention_mask, settings, stop_ids, pad_id, synced_gpus=False):
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            **settings.to_kwargs(),
            eos_token_id=stop_ids,
            pad_token_id=pad_id,
            use_cache=True,
            synced_gpus=synced_gpus,
        )


# --------------------------------------------------------------------------- decode loop


def _base_model(model):
    """The transformers model under a peft wrapper (the wrapper's LoRA layers stay in it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _plain_base(module: nn.Module) -> nn.Linear | None:
    """The plain ``nn.Linear`` that computes ``module``'s main output: the module itself,
    or the base layer of a peft LoRA layer (whose adapter output `lora_output` adds).
    None for anything else (quantised layers, DoRA, other wrappers): called as is."""
    if type(module) is nn.Linear:
        return module
    base = getattr(module, "base_layer", None)
    if type(base) is nn.Linear and hasattr(module, "lora_A") and not getattr(module, "lora_variant", None):
        return base
    return None


def lora_output(layer: nn.Module, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """peft's ``lora.Linear.forward`` after its base layer: ``result`` (the base layer's
    output for ``x``) plus each active adapter's scaled output, in peft's order and
    dtypes, so the sum is the one the wrapped layer returns."""
    if layer.disable_adapters or layer.merged:
        return result
    dtype = result.dtype
    for name in layer.active_adapters:
        if name not in layer.lora_A.keys():
            continue
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        x = layer._cast_input_dtype(x, lora_a.weight.dtype)
        result = result + lora_b(lora_a(layer.lora_dropout[name](x))) * layer.scaling[name]
    return result.to(dtype)


def _version(tensor: torch.Tensor) -> int:
    """In-place change counter; inference tensors (made under ``inference_mode``, as
    Lightning's predict loop makes them) keep none and cannot be changed outside it."""
    return 0 if tensor.is_inference() else tensor._version


def _packing_available() -> bool:
    """Whether oneDNN can pre-pack bf16 weights here: it needs its bf16 kernels (an
    AVX2-only CPU has none, and the reorder op raises there)."""
    ops = getattr(torch.ops, "mkldnn", None)
    return hasattr(ops, "_reorder_linear_weight") and cpu_bf16_is_native()


class FusedProjection:
    """Several linear layers reading the same input, run as one matmul when they can be.

    The plain ``nn.Linear`` weights (a LoRA layer's base layer included; its adapter is
    then added by `lora_output`, exactly as peft adds it) are fused on CPU into one
    weight, held in the dtype the matmul runs in (the autocast dtype under autocast,
    which would otherwise cast the frozen weights again at every step; the values are
    the same either way), and rebuilt when a weight changes (tracked by the tensors'
    version counters). Other layers (quantised, DoRA) are called one by one.
    Concatenating output rows does not change any output value, so fusion keeps
    outputs bit-identical (checked by `tests/test_generation_engine.py`).

    A bfloat16 fused weight is also pre-packed into oneDNN's blocked layout, which
    ``F.linear`` would otherwise re-derive from the plain layout at every call (timed
    by ``benchmarks/generation.py``). bf16 ``F.linear`` on CPU runs
    the same oneDNN kernel, so outputs are unchanged; each rebuild checks that on its
    real input and drops the packing if they differ.

    A copy is made only when it buys something: packing, or a cast the matmul would
    otherwise redo at every step. Otherwise (fp32 weights without autocast, or bf16
    where oneDNN cannot pack it) the layers' own weights are used one by one: fusing
    alone does not make fp32 faster on CPU, and it would hold a second copy of every
    weight.
    """

    # Seconds spent building fused and packed weights, over all instances: the engine's
    # warm-up, reported once per model by `DecodeLoop.generate`.
    build_seconds = 0.0

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules
        self.bases = [_plain_base(m) for m in modules]
        self.fusible = (
            all(base is not None for base in self.bases)
            and self.bases[0].weight.device.type == "cpu"
            and len({base.bias is None for base in self.bases}) == 1
        )
        self.sizes = [base.out_features for base in self.bases] if self.fusible else None
        self._key = None
        self._weight: torch.Tensor | None = None
        self._bias: torch.Tensor | None = None
        self._packed: torch.Tensor | None = None
        self._dtype: torch.dtype | None = None
        self._direct = False  # no copy: the layers' own weights, one matmul each

    def _refresh(self, x: torch.Tensor) -> None:
        """(Re)build the fused weight when the dtype, batch or a weight changed."""
        weights = [base.weight for base in self.bases]
        dtype = weights[0].dtype
        if torch.is_autocast_enabled(x.device.type) and dtype == torch.float32:
            dtype = torch.get_autocast_dtype(x.device.type)
        rows = x.numel() // x.shape[-1]
        key = (dtype, rows, *(_version(w) for w in weights), *(w.data_ptr() for w in weights))
        if key == self._key:
            return
        start = time.perf_counter()
        packable = dtype == torch.bfloat16 and _packing_available()
        self._direct = dtype == weights[0].dtype and not packable
        if self._direct:
            self._weight = self._bias = self._packed = None
            self._key = key
            return
        with torch.no_grad():
            self._weight = torch.cat(weights).to(dtype)
            biases = [base.bias for base in self.bases]
            self._bias = None if biases[0] is None else torch.cat(biases).to(dtype)
            self._packed = None
            self._dtype = dtype
            if packable:
                packed = torch.ops.mkldnn._reorder_linear_weight(self._weight, rows)
                flat = x.reshape(rows, -1).to(dtype)
                if torch.equal(self._packed_linear(flat, packed), F.linear(flat, self._weight, self._bias)):
                    # The packed copy is all the loop needs: not holding the plain fused
                    # one as well saves a copy of the weights.
                    self._packed, self._weight = packed, None
        self._key = key
        FusedProjection.build_seconds += time.perf_counter() - start

    @property
    def holds_copy(self) -> bool:
        """Whether the last call ran on a fused (and possibly packed) copy of the weights."""
        return self._weight is not None or self._packed is not None

    def _packed_linear(self, flat: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(flat, packed, self._bias, "none", [], "")

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (..., H) -> one (..., out_i) tensor per layer."""
        if not self.fusible:
            return [module(x) for module in self.modules]
        self._refresh(x)
        if self._direct:
            pieces = [F.linear(x, base.weight, base.bias) for base in self.bases]
        else:
            if self._packed is not None:
                flat = x.reshape(-1, x.shape[-1]).to(self._dtype)
                out = self._packed_linear(flat, self._packed).view(*x.shape[:-1], -1)
            else:
                out = F.linear(x, self._weight, self._bias)
            pieces = out.split(self.sizes, dim=-1)
        return [
            piece if module is base else lora_output(module, x, piece)
            for piece, module, base in zip(pieces, self.modules, self.bases, strict=True)
        ]


class _Layer:
    """One decoder layer's pieces, as the decode loop uses them."""

    def __init__(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        self.attn = attn
        self.input_norm = layer.input_layernorm
        self.post_norm = layer.post_attention_layernorm
        self.qkv = FusedProjection([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = FusedProjection([attn.o_proj])
        self.gate_up = FusedProjection([mlp.gate_proj, mlp.up_proj])
        self.down = FusedProjection([mlp.down_proj])
        self.act = mlp.act_fn
        self.head_dim = attn.head_dim
        self.rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb


def _layer_modules(decoder) -> tuple[int, ...]:
    """Identity of every module the decode loop calls: wrapping a projection with a LoRA
    layer after the loop first saw the model replaces it and changes this."""
    return tuple(
        id(module)
        for layer in decoder.layers
        for module in (
            layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
            layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj,
        )
    )


def _attention_function(config) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    implementation = getattr(config, "_attn_implementation", "sdpa") or "sdpa"
    if implementation == "eager":
        module = sys.modules[f"transformers.models.{config.model_type}.modeling_{config.model_type}"]
        return module.eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


class DecodeLoop:
    """ucai's decode loop for Llama-family decoders (see the module docstring)."""

    name = "decode_loop"

    def __init__(self):
        # decoder -> (identity of its modules, its layers, the output projection). Weakly
        # keyed: the fused copies live only as long as the model; holding the model here
        # would keep a finished stage's weights (and their copies) in memory.
        self._layers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ support

    def unsupported(self, model) -> str | None:
        base = _base_model(model)
        config = getattr(base, "config", None)
        if config is None or getattr(config, "model_type", None) not in _DECODER_TYPES:
            return f"model type {getattr(config, 'model_type', type(model).__name__)!r} (supported: {', '.join(_DECODER_TYPES)})"
        if getattr(config, "_attn_implementation", "sdpa") not in _ATTENTION:
            return f"attention implementation {config._attn_implementation!r}"
        if getattr(config, "use_sliding_window", False) or (
            config.model_type == "mistral" and getattr(config, "sliding_window", None)
        ):
            return "sliding-window attention"
        decoder = getattr(base, getattr(base, "base_model_prefix", "model"), None)
        if decoder is None or not hasattr(decoder, "layers") or not hasattr(decoder, "rotary_emb"):
            return "no decoder layers / rotary embedding where a Llama-family model keeps them"
        for layer in decoder.layers:
            attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            needed = (attn, mlp, getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
            if any(part is None for part in needed) or getattr(layer, "attention_type", "full_attention") != "full_attention":
                return "a decoder layer unlike Llama's"
            if any(hasattr(attn, name) for name in ("q_norm", "k_norm")):
                return "query/key norms"
        parameter = next(base.parameters())
        # FSDP (DTensor), DeepSpeed ZeRO-3 (empty local shards) and meta tensors hold no
        # full weights to run the layers with.
        if (
            parameter.device.type == "meta"
            or type(parameter).__name__ == "DTensor"
            or parameter.numel() == 0
            or hasattr(parameter, "ds_id")
        ):
            return "sharded or meta parameters"
        generation_config = getattr(base, "generation_config", None)
        for field, defaults in _UNSUPPORTED_PROCESSORS.items():
            value = getattr(generation_config, field, None)
            if value not in defaults and value != []:
                return f"generation_config.{field}={value!r}"
        return None

    def _layers_of(self, decoder, lm_head: nn.Module) -> tuple[list[_Layer], FusedProjection]:
        """The decoder's layers and output projection with their fused weights, kept for
        one model at a time."""
        modules = (*_layer_modules(decoder), id(lm_head))
        cached = self._layers.get(decoder)
        if cached is None or cached[0] != modules:
            self._layers.clear()  # one model at a time
            cached = (modules, [_Layer(layer) for layer in decoder.layers], FusedProjection([lm_head]))
            self._layers[decoder] = cached
        return cached[1], cached[2]

    # ------------------------------------------------------------------ decoding

    @torch.no_grad()
    def generate(self, model, input_ids, attention_mask, settings, stop_ids, pad_id, synced_gpus=False):
        """See `GenerationEngine.generate`.

        Args:
            input_ids: (B, P) left-padded prompt ids; attention_mask: (B, P) 1 for tokens.
        Returns:
            (B, P + T) ids.
        """
        if settings.max_new_tokens < 1:
            return input_ids
        base = _base_model(model)
        decoder = getattr(base, base.base_model_prefix)
        first_call = decoder not in self._layers
        built_before = FusedProjection.build_seconds
        layers, lm_head = self._layers_of(decoder, base.get_output_embeddings())
        try:
            return self._decode(model, base, decoder, layers, lm_head, input_ids, attention_mask, settings, stop_ids, pad_id)
        finally:
            if first_call and layers and layers[0].qkv.holds_copy:
                log.info(
                    "generation: decode loop (its warm-up, fusing and packing the weights: %.2f s, "
                    "counted in this stage's time)",
                    FusedProjection.build_seconds - built_before,
                )
            elif first_call:
                log.info("generation: decode loop (on the model's own weights: nothing to fuse or pack)")

    def _decode(self, model, base, decoder, layers, lm_head, input_ids, attention_mask, settings, stop_ids, pad_id):
        """The decoding itself (see `generate`)."""
        batch, prompt_length = input_ids.shape
        device = input_ids.device
        total = prompt_length + settings.max_new_tokens
        processors = logits_processors(settings, attention_mask)

        # Prefill with the model's own forward: the same positions, mask and kernels
        # as `generate`, and its cache is copied into the preallocated one below.
        positions = position_ids(attention_mask)  # (B, P); the prompt is left-padded
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
        )
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        keys, values = [], []
        for index in range(len(layers)):
            layer_keys, layer_values = _cache_layer(cache, index)  # (B, KVH, P, D)
            k = layer_keys.new_empty((batch, layer_keys.shape[1], total, layer_keys.shape[3]))
            v = layer_values.new_empty((batch, layer_values.shape[1], total, layer_values.shape[3]))
            k[:, :, :prompt_length] = layer_keys
            v[:, :, :prompt_length] = layer_values
            keys.append(k)
            values.append(v)
        del cache

        tokens = input_ids.new_full((batch, total), pad_id)  # (B, P + T)
        tokens[:, :prompt_length] = input_ids
        # Generated positions are always attended (as `generate` extends its mask with
        # ones); with no padding at all the mask is dropped, as transformers does.
        padded = bool((attention_mask == 0).any())
        full_mask = additive_mask(attention_mask, total, keys[0].dtype)  # (B, 1, 1, P + T)
        position = positions[:, -1:]  # (B, 1)
        stop = torch.tensor(stop_ids, device=device)
        unfinished = torch.ones(batch, dtype=torch.long, device=device)
        logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)  # (B, V)
        del out
        length = prompt_length
        attention = _attention_function(base.config)
        while True:
            next_tokens = choose_tokens(logits, tokens[:, :length], processors, settings.do_sample)
            next_tokens = next_tokens * unfinished + pad_id * (1 - unfinished)
            tokens[:, length] = next_tokens
            length += 1
            unfinished = unfinished & ~torch.isin(next_tokens, stop)
            if length == total or not bool(unfinished.any()):
                break
            position = position + 1
            hidden = decoder.embed_tokens(next_tokens[:, None])  # (B, 1, H)
            cos_sin = decoder.rotary_emb(hidden, position)
            mask = full_mask[..., :length] if padded else None
            for index, layer in enumerate(layers):
                hidden = self._layer_step(
                    layer, hidden, cos_sin, keys[index], values[index], length, mask, attention
                )
            hidden = decoder.norm(hidden)
            logits = lm_head(hidden)[0][:, -1].to(dtype=torch.float32)  # (B, V)
        return tokens[:, :length]

    @staticmethod
    def _layer_step(layer: _Layer, hidden, cos_sin, keys, values, length: int, mask, attention) -> torch.Tensor:
        """One decoder layer for one new token per row.

        Args:
            hidden: (B, 1, H); keys/values: (B, KVH, P + T, D) cache, filled to
                ``length - 1``; this step writes position ``length - 1``.
            mask: (B, 1, 1, length) additive mask, or None when nothing is padded.
        Returns:
            (B, 1, H).
        """
        batch = hidden.shape[0]
        residual = hidden
        x = layer.input_norm(hidden)
        q, k, v = layer.qkv(x)
        shape = (batch, 1, -1, layer.head_dim)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))  # (B, heads, 1, D)
        cos, sin = cos_sin
        q, k = layer.rotary(q, k, cos, sin)
        keys[:, :, length - 1 : length] = k
        values[:, :, length - 1 : length] = v
        out, _ = attention(
            layer.attn,
            q,
            keys[:, :, :length],
            values[:, :, :length],
            mask,
            dropout=0.0,
            scaling=layer.attn.scaling,
        )
        out = layer.o(out.reshape(batch, 1, -1).contiguous())[0]
        hidden = residual + out
        residual = hidden
        x = layer.post_norm(hidden)
        gate, up = layer.gate_up(x)
        hidden = residual + layer.down(layer.act(gate) * up)[0]
        return hidden


def additive_mask(attention_mask: torch.Tensor, total: int, dtype: torch.dtype) -> torch.Tensor:
    """The padding mask of every decode step at once, in the form SDPA's CPU kernels use.

    transformers hands SDPA a boolean mask, which the kernel turns into 0 / -inf in the
    query dtype at every call of every layer; building that additive mask once gives
    the kernel the same values without the per-call conversion.

    Args:
        attention_mask: (B, P) 1 for prompt tokens, 0 for left padding.
    Returns:
        (B, 1, 1, total) 0 where attended (prompt tokens and every generated position),
        -inf at padding; step ``length`` uses ``[..., :length]``.
    """
    batch, prompt_length = attention_mask.shape
    attended = torch.ones((batch, total), dtype=torch.bool, device=attention_mask.device)
    attended[:, :prompt_length] = attention_mask.bool()
    mask = torch.zeros((batch, total), dtype=dtype, device=attention_mask.device)
    return mask.masked_fill(~attended, float("-inf"))[:, None, None, :]


def _cache_layer(cache, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of layer ``index`` of a transformers cache, each (B, KVH, P, D)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[index].keys, layers[index].values
    return cache[index][0], cache[index][1]


def logits_processors(settings, attention_mask: torch.Tensor):
    """The processors `generate` applies for these settings, in its order: repetition
    penalty, then (when sampling) temperature, top-k and top-p.

    Like `generate`, the repetition penalty skips each row's left padding (pad ids are
    often eos ids, which it would otherwise penalise on padded rows only).

    Args:
        attention_mask: (B, P) 1 for prompt tokens, 0 for left padding.
    """
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if settings.repetition_penalty is not None and settings.repetition_penalty != 1.0:
        padding = (attention_mask != 0).int().argmax(dim=1)  # (B,) left-pad length per row
        processors.append(
            RepetitionPenaltyLogitsProcessor(penalty=settings.repetition_penalty, prompt_ignore_length=padding)
        )
    if settings.do_sample:
        if settings.temperature is not None and settings.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k:
            processors.append(TopKLogitsWarper(top_k=settings.top_k))
        if settings.top_p is not None and settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=settings.top_p))
    return processors


def choose_tokens(logits: torch.Tensor, tokens: torch.Tensor, processors, do_sample: bool) -> torch.Tensor:
    """Next token per row, as `generate` picks it.

    Args:
        logits: (B, V) float32 logits of the next token; tokens: (B, L) ids so far.
    Returns:
        (B,) ids: sampled from the processed distribution, or its argmax.
    """
    scores = processors(tokens, logits) if processors else logits
    if do_sample:
        return torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    return torch.argmax(scores, dim=-1)


# --------------------------------------------------------------------------- registry

ENGINES: dict[str, Callable[[], GenerationEngine]] = {"hf": HFGenerate, "decode_loop": DecodeLoop}
_instances: dict[str, GenerationEngine] = {}
_fallbacks_logged: set[tuple[str, str]] = set()


def register_engine(name: str, factory: Callable[[], GenerationEngine]) -> None:
    """Make ``factory()`` available as ``generation.engine: <name>`` (e.g. a vLLM backend)."""
    ENGINES[name] = factory
    _instances.pop(name, None)


def engine_named(name: str) -> GenerationEngine:
    if name not in ENGINES:
        from ucai.errors import UcaiError

        raise UcaiError(f"unknown generation engine {name!r}; choose one of: auto, {', '.join(ENGINES)}")
    if name not in _instances:
        _instances[name] = ENGINES[name]()
    return _instances[name]


def select_engine(name: str, model, synced_gpus: bool = False) -> GenerationEngine:
    """The engine to run: ``name``, or for ``auto`` the decode loop where it applies.

    ``auto`` falls back to ``hf`` (logged once per reason) for models the decode loop
    does not support and under FSDP (``synced_gpus``); a named engine that cannot run
    the model is an error.
    """
    if name != "auto":
        engine = engine_named(name)
        reason = engine.unsupported(model)
        if reason is not None:
            from ucai.errors import UcaiError

            raise UcaiError(f"generation engine {name!r} cannot run this model: {reason}; use engine: auto or hf")
        return engine
    loop = engine_named("decode_loop")
    reason = "FSDP (ranks must step together)" if synced_gpus else loop.unsupported(model)
    if reason is None:
        return loop
    if (type(model).__name__, reason) not in _fallbacks_logged:
        _fallbacks_logged.add((type(model).__name__, reason))
        log.info("generation: using transformers generate (the decode loop does not support %s)", reason)
    return engine_named("hf")
