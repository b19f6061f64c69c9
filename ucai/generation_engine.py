"""Generation engines: Hugging Face ``generate`` and ucai's lean decode loop.

Every generating stage calls `ucai.stages.generation.generate`, which hands the
tokenised batch to an engine picked by `select_engine`. An engine is one small
interface (`GenerationEngine`): ``unsupported(model)`` says why it cannot run a model
(None when it can), and ``generate(...)`` returns the (B, P + T) ids that HF
``generate`` would return. Three ship here:

* ``hf`` — ``model.generate`` (any architecture, FSDP with ``synced_gpus``).
* ``decode_loop`` — for Llama-family decoders (Llama, Mistral, Qwen2; SmolLM2 is a
  Llama). Prefill runs through the model's own forward; each decode step then runs the
  layers directly on a preallocated KV cache, attending only to the filled part, with
  masks and positions built once, and with the q/k/v and gate/up projections fused
  into one matmul each on CPU where the weights need a bf16 copy anyway (packed for
  oneDNN, or cast once for autocast; small matmuls there are dominated by per-call
  overhead; `ucai.fused_projection`). The layer pieces are the model's own modules and functions (norms,
  rotary embedding, its attention function), so greedy decoding is token-identical to
  ``generate``; sampling applies the same logits processors in the same order. It is
  the fast engine's test oracle.
* ``fast`` (the default) — the decode loop with shared prompt prefixes prefilled once
  and, on CPU, each layer's work between its matmuls in fused C++ kernels
  (`ucai.native_decode`): *faithful* rather than token-identical (`FastDecode`;
  faithfulness is defined and measured in `ucai.generation_fidelity`).

Both decode engines can sample per row from seeded streams (`ucai.next_token`), so that
the batch a prompt lands in does not change its sample, and report each step to an
observer (the fidelity check, PPO's KL(engine ‖ model)).

``register_engine`` adds another engine under a name (a vLLM backend for GPU users
would plug in here); ``GenerationSettings.engine`` picks one, and ``auto`` uses the
fast engine where it applies and falls back to ``hf`` with one log line otherwise.
"""

from __future__ import annotations

import gc
import logging
import sys
import weakref
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from ucai.decode_kernels import rms_norm, rotate, signed_sin
from ucai.fused_projection import FusedProjection, fits_in_free_memory
from ucai.hardware import cpu_bf16_is_native
from ucai.native_decode import native_kernels
from ucai.next_token import choose_tokens, chosen_logprob, logits_processors, row_seed, row_uniforms
from ucai.prefill import Prefill, plain_prefill, shared_prefix_prefill

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
        *,
        seeds: list[int] | None = None,
        observer: Callable | None = None,
    ) -> torch.Tensor:
        """(B, P + T) prompt ids (left-padded, as given) followed by the completions;
        rows that stopped are padded with ``pad_id`` after their stop token, and T is
        the longest completion (at most ``settings.max_new_tokens``). ``seeds``: one
        sampling seed per row (an engine that cannot seed per row draws from the
        global RNG); ``observer``: called per step with (raw logits (B, V), the chosen
        ids' log-probs under the processed (sampling) distribution (B,), chosen ids
        (B,))."""


class HFGenerate:
    """``model.generate``: every architecture and strategy transformers supports.

    It draws from the global RNG: given per-row ``seeds``, it seeds that RNG from them
    (so a batch of the same prompts samples the same, resumed or not), but a row's
    sample then depends on its batch (logged once). An
    ``observer`` is fed from ``generate``'s per-step logits and scores, which it keeps
    in memory until the end (2 x T x (B, V) floats); under FSDP (``synced_gpus``, large
    models and batches) that is not done, and the observer sees nothing (logged once).
    """

    name = "hf"
    _seed_warning_logged = False
    _observer_warning_logged = False

    @property
    def version(self) -> str:
        import transformers

        return f"hf-{transformers.__version__}"

    def unsupported(self, model) -> str | None:
        return None

    def generate(
        self, model, input_ids, attention_mask, settings, stop_ids, pad_id, synced_gpus=False, *, seeds=None, observer=None
    ):
        if seeds is not None and settings.do_sample:
            torch.manual_seed(row_seed(0, ",".join(map(str, seeds))) % 2**63)
            if not HFGenerate._seed_warning_logged:
                HFGenerate._seed_warning_logged = True
                log.info("generation: transformers generate seeds its RNG per batch, not per prompt")
        if observer is not None and synced_gpus:
            if not HFGenerate._observer_warning_logged:
                HFGenerate._observer_warning_logged = True
                log.info("generation: per-step log-probs are not recorded under FSDP (they would hold every step's logits)")
            observer = None
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            **settings.to_kwargs(),
            eos_token_id=stop_ids,
            pad_token_id=pad_id,
            use_cache=True,
            synced_gpus=synced_gpus,
            return_dict_in_generate=observer is not None,
            output_logits=observer is not None,
            output_scores=observer is not None,
        )
        if observer is None:
            return out
        completions = out.sequences[:, input_ids.shape[1] :]
        for step, (logits, scores) in enumerate(zip(out.logits, out.scores, strict=True)):
            chosen = completions[:, step]
            observer(logits.float(), chosen_logprob(scores, chosen), chosen)
        return out.sequences


# --------------------------------------------------------------------------- decode loop


def _base_model(model):
    """The transformers model under a peft wrapper (the wrapper's LoRA layers stay in it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class _Layer:
    """One decoder layer's pieces, as the decode loop uses them."""

    def __init__(self, layer: nn.Module, pack_float32: bool = False):
        attn, mlp = layer.self_attn, layer.mlp
        self.attn = attn
        self.input_norm = layer.input_layernorm
        self.post_norm = layer.post_attention_layernorm
        self.qkv = FusedProjection([attn.q_proj, attn.k_proj, attn.v_proj], pack_float32)
        self.o = FusedProjection([attn.o_proj], pack_float32)
        self.gate_up = FusedProjection([mlp.gate_proj, mlp.up_proj], pack_float32)
        self.down = FusedProjection([mlp.down_proj], pack_float32)
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
    # Bump when a change can change what the engine generates: cached answers keyed on
    # it (the evaluation's) are then regenerated.
    version = "decode_loop-3"
    # float32 weights pre-packed for oneDNN (faster, not bit-identical: `FusedProjection`).
    pack_float32 = False
    # top-p by a partial sort (`ucai.next_token.PartialSortTopP`; the same cut up to
    # rounding at its boundary) instead of transformers' full sort.
    partial_sort_top_p = False

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
            pack = self.pack_float32 and fits_in_free_memory([decoder.layers, lm_head])
            cached = (modules, [_Layer(layer, pack) for layer in decoder.layers], FusedProjection([lm_head], pack))
            self._layers[decoder] = cached
        return cached[1], cached[2]

    # ------------------------------------------------------------------ decoding

    @torch.no_grad()
    def generate(
        self, model, input_ids, attention_mask, settings, stop_ids, pad_id, synced_gpus=False, *, seeds=None, observer=None
    ):
        """See `GenerationEngine.generate`.

        Args:
            input_ids: (B, P) left-padded prompt ids; attention_mask: (B, P) 1 for tokens.
            seeds: B per-row sampling seeds (`ucai.next_token.row_seed`), or None to draw
                from the global RNG as ``generate`` does.
            observer: called each step with (raw logits (B, V), the chosen ids'
                processed log-probs (B,), chosen ids (B,)), e.g. a
                `ucai.next_token.StepRecorder`.
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
        # Python's cyclic garbage collector off while decoding: each step allocates a
        # few hundred short-lived objects, which set off collections that walk the
        # model's thousands of live objects (3-5% of a SmolLM2 bf16 generation here);
        # the loop makes no reference cycles, and the collector is back on afterwards.
        # The switch is process-wide: another thread's cycles wait until then.
        collecting = gc.isenabled()
        gc.disable()
        try:
            # The prefill is passed on without a name here, so `_decode` can free the
            # prompt cache once it is copied into the preallocated one.
            return self._decode(
                base, decoder, layers, lm_head, self.prefill(model, input_ids, attention_mask, pad_id),
                input_ids, attention_mask, settings, stop_ids, pad_id, seeds, observer,
            )
        finally:
            if collecting:
                gc.enable()
            if first_call and layers and layers[0].qkv.holds_copy:
                log.info(
                    "generation: %s (its warm-up, fusing and packing the weights: %.2f s, "
                    "counted in this stage's time)",
                    self.description, FusedProjection.build_seconds - built_before,
                )
            elif first_call:
                log.info("generation: %s (on the model's own weights: nothing to fuse or pack)", self.description)

    description = "decode loop (token-identical to generate)"

    def prefill(self, model, input_ids, attention_mask, pad_id) -> Prefill:
        """The model's own forward over the prompts: the same positions, mask and
        kernels as ``generate``."""
        return plain_prefill(model, input_ids, attention_mask)

    def _decode(
        self, base, decoder, layers, lm_head, prefill: Prefill, input_ids, attention_mask, settings, stop_ids, pad_id,
        seeds, observer,
    ):
        """The decoding itself (see `generate`). The cache has the prefill's layout
        (width W); the returned tokens the caller's (prompt width P)."""
        batch, prompt_length = input_ids.shape
        cached = prefill.mask.shape[1]  # W
        device = input_ids.device
        steps = settings.max_new_tokens
        processors = logits_processors(settings, attention_mask, partial_sort_top_p=self.partial_sort_top_p)
        uniforms = row_uniforms(seeds, steps, device) if seeds is not None and settings.do_sample else None

        keys, values = [], []
        for layer_keys, layer_values in zip(prefill.keys, prefill.values, strict=True):  # (B, KVH, W, D)
            shape = (batch, layer_keys.shape[1], cached + steps, layer_keys.shape[3])
            k, v = layer_keys.new_empty(shape), layer_values.new_empty(shape)
            k[:, :, :cached] = layer_keys
            v[:, :, :cached] = layer_values
            keys.append(k)
            values.append(v)
        logits = prefill.logits  # (B, V)
        position = prefill.last_position  # (B, 1)
        padded = bool((prefill.mask == 0).any())
        # Generated positions are always attended (as `generate` extends its mask with
        # ones); with no padding at all the mask is dropped, as transformers does.
        full_mask = additive_mask(prefill.mask, cached + steps, keys[0].dtype)  # (B, 1, 1, W + T)
        del prefill

        tokens = input_ids.new_full((batch, prompt_length + steps), pad_id)  # (B, P + T)
        tokens[:, :prompt_length] = input_ids
        stop = torch.tensor(stop_ids, device=device)
        unfinished = torch.ones(batch, dtype=torch.long, device=device)
        attention = _attention_function(base.config)
        run_layers = self._layers_runner(base, decoder, layers, keys[0].dtype)
        step = 0
        while True:
            step_uniforms = uniforms[:, step] if uniforms is not None else None
            next_tokens, processed_logprobs = choose_tokens(
                logits, tokens[:, : prompt_length + step], processors, settings.do_sample, step_uniforms,
                logprobs=observer is not None,
            )
            next_tokens = next_tokens * unfinished + pad_id * (1 - unfinished)
            if observer is not None:
                # Rows already finished get the pad id; their log-probs are masked out.
                observer(logits, processed_logprobs, next_tokens)
            tokens[:, prompt_length + step] = next_tokens
            step += 1
            unfinished = unfinished & ~torch.isin(next_tokens, stop)
            if step == steps or not bool(unfinished.any()):
                break
            position = position + 1
            length = cached + step  # cache positions attended this step, the new one included
            hidden = decoder.embed_tokens(next_tokens[:, None])  # (B, 1, H)
            cos_sin = self.rotary_tables(decoder, hidden, position)
            mask = full_mask[..., :length] if padded else None
            hidden = run_layers(hidden, cos_sin, keys, values, length, mask, attention)
            logits = lm_head(hidden)[0][:, -1].to(dtype=torch.float32)  # (B, V)
        return tokens[:, : prompt_length + step]

    def _layers_runner(self, base, decoder, layers: list[_Layer], dtype: torch.dtype) -> Callable:
        """The function that runs every layer and the final norm for one step:
        ``(hidden (B, 1, H), rotary tables, keys, values, length, mask, attention)`` ->
        normed hidden (B, 1, H), writing the step's keys and values into the caches."""

        def run(hidden, cos_sin, keys, values, length, mask, attention):
            for index, layer in enumerate(layers):
                hidden = self._layer_step(layer, hidden, cos_sin, keys[index], values[index], length, mask, attention)
            return self._norm(decoder.norm, hidden)

        return run

    @staticmethod
    def rotary_tables(decoder, hidden, position):
        """The step's rotary tables, as the layers take them."""
        return decoder.rotary_emb(hidden, position)

    @staticmethod
    def _norm(norm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return norm(hidden)

    @staticmethod
    def _layer_step(layer: _Layer, hidden, cos_sin, keys, values, length: int, mask, attention) -> torch.Tensor:
        """One decoder layer for one new token per row.

        Args:
            hidden: (B, 1, H); keys/values: (B, KVH, W + T, D) cache, filled to
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


class FastDecode(DecodeLoop):
    """The default engine: the decode loop with shared prompt prefixes prefilled once
    and fewer small ops per step.

    Not token-identical to ``generate`` in bf16 (its prefill batches rows differently,
    so matmuls round differently), but *faithful*: each token's log-prob under the
    engine is as close to the model's own forward as ``generate``'s is
    (`ucai.generation_fidelity`; checked by the tests, printed by
    ``benchmarks/generation.py``). What differs from `DecodeLoop`:

    * prompts that share a beginning (a principle's system prompt) have it prefilled
      once (`ucai.prefill.shared_prefix_prefill`);
    * in bfloat16 on a CPU with native bf16, each layer's work between its matmuls
      runs in three fused C++ calls (`ucai.native_decode`, `NativeLayers`): the
      residual add with the next norm, the rotary embedding with the cache write and a
      one-row attention, and SiLU-times-up. They round as PyTorch's ops do, and the
      attention follows PyTorch's CPU flash kernel (float32 scores, its fast exp,
      weights rounded to bf16), so the engine's log-probs stay as close to the forward
      as ``generate``'s (16 prompts x 128 greedy tokens, mean / max |Δ log-prob|:
      SmolLM2 2.30e-2 / 0.234 against ``generate``'s 2.36e-2 / 0.196; tiny test model
      8.3e-5 / 7.8e-3 against 1.95e-4 / 7.8e-3). SmolLM2 bf16, batch 16, 2 threads:
      ~33% less time per decode step than the PyTorch ops (``benchmarks/generation.py``
      prints both). Where the kernels do not run (no C++ compiler,
      ``UCAI_NATIVE_KERNELS=0``, float32 weights, an AVX2-only CPU:
      `bf16_kernels_faithful_here`, an activation other than SiLU) the layers run as
      PyTorch ops, with the norms as PyTorch's fused ``rms_norm`` and the queries and
      keys rotated together (`ucai.decode_kernels`), with one log line;
    * on a CPU with AMX, the bf16 projections of up to 32 rows run the native tile
      matmul (`FusedProjection`, bit-identical to oneDNN's there; 1.6x its packed
      matmul over SmolLM2's projections at 16 rows);
    * float32 weights are pre-packed for oneDNN as bf16 ones are (`FusedProjection`),
      when the copy fits in a quarter of the free memory: fp32 PPO rollouts decode
      ~1.5x faster per matmul on one core;
    * top-p sorts only the most likely tokens, and seeded sampling draws from the kept
      ones without writing the filtered vocabulary (`ucai.next_token.PartialSortTopP`).

    The shared prefill does drift a little further in bf16 (SmolLM2, 16 rows sharing a
    long system prompt: mean |Δ log-prob| 1.85e-2 against ``generate``'s 1.66e-2),
    for about 9% of a preferences stage's generation time.
    """

    name = "fast"
    version = "fast-5"  # 5: the bf16 softmax sums its total in 16 lanes
    pack_float32 = True
    partial_sort_top_p = True
    description = "fast decode (shared prefixes prefilled once, native kernels between the matmuls where they apply)"

    def unsupported(self, model) -> str | None:
        reason = super().unsupported(model)
        if reason is not None:
            return reason
        base = _base_model(model)
        decoder = getattr(base, base.base_model_prefix)
        norms = [decoder.norm] + [n for layer in decoder.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        if any(not hasattr(n, "variance_epsilon") or getattr(n, "weight", None) is None for n in norms):
            return "a norm unlike Llama's RMSNorm"
        return None

    _native_skips_logged: set[str] = set()

    def _layers_runner(self, base, decoder, layers: list[_Layer], dtype: torch.dtype) -> Callable:
        """`NativeLayers` where the fused kernels apply (`native_layers_unsupported`)
        and could be built, else the PyTorch ops of `_layer_step` (one log line why)."""
        reason = native_layers_unsupported(base, decoder, layers, dtype)
        kernels = native_kernels() if reason is None else None
        if kernels is None:
            if reason is not None and reason not in self._native_skips_logged:
                self._native_skips_logged.add(reason)
                log.info("generation: native decode kernels not used (%s); PyTorch ops instead", reason)
            return super()._layers_runner(base, decoder, layers, dtype)
        return NativeLayers(kernels, layers, decoder.norm)

    def prefill(self, model, input_ids, attention_mask, pad_id) -> Prefill:
        shared = shared_prefix_prefill(model, input_ids, attention_mask, pad_id)
        return shared if shared is not None else plain_prefill(model, input_ids, attention_mask)

    @staticmethod
    def rotary_tables(decoder, hidden, position):
        cos, sin = decoder.rotary_emb(hidden, position)  # (B, 1, D)
        return cos, signed_sin(sin)

    @staticmethod
    def _norm(norm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden, norm.weight, norm.variance_epsilon)

    @staticmethod
    def _layer_step(layer: _Layer, hidden, cos_sin, keys, values, length: int, mask, attention) -> torch.Tensor:
        """One decoder layer for one new token per row (see `DecodeLoop._layer_step`)."""
        batch = hidden.shape[0]
        x = rms_norm(hidden, layer.input_norm.weight, layer.input_norm.variance_epsilon)
        q, k, v = layer.qkv(x)  # (B, 1, H_q * D), (B, 1, KVH * D) x 2
        dim = layer.head_dim
        q_heads = q.shape[-1] // dim
        cos, sin_signed = cos_sin
        # Queries and keys rotate together: one set of ops for both.
        rotated = rotate(torch.cat((q, k), dim=-1).view(batch, -1, dim), cos, sin_signed)  # (B, H_q + KVH, D)
        keys[:, :, length - 1] = rotated[:, q_heads:]
        values[:, :, length - 1] = v.view(batch, -1, dim)
        out, _ = attention(
            layer.attn,
            rotated[:, :q_heads, None],  # (B, H_q, 1, D)
            keys[:, :, :length],
            values[:, :, :length],
            mask,
            dropout=0.0,
            scaling=layer.attn.scaling,
        )
        hidden = hidden + layer.o(out.reshape(batch, 1, -1))[0]
        x = rms_norm(hidden, layer.post_norm.weight, layer.post_norm.variance_epsilon)
        gate, up = layer.gate_up(x)
        return hidden + layer.down(layer.act(gate) * up)[0]


def bf16_kernels_faithful_here() -> bool:
    """Whether the native kernels' bf16 results follow PyTorch's closely enough here to
    be used: on a CPU with native bf16 (AVX-512 / AMX), the machine they were built to
    follow (SmolLM2, 16 prompts x 128 greedy tokens: mean |Δ log-prob| 2.30e-2 against
    ``generate``'s 2.36e-2, 1.5x faster a step). On an AVX2-only CPU PyTorch's bf16
    kernels take other paths (8-wide vectors, a reference matmul): the kernels drifted
    further than ``generate`` there (2.45e-2 against 2.39e-2, the PyTorch ops 2.39e-2)
    for 8% of a step, and bf16 is the slow choice on such a CPU anyway (the pipeline
    falls back to float32)."""
    return cpu_bf16_is_native()


def native_layers_unsupported(base, decoder, layers: list[_Layer], dtype: torch.dtype) -> str | None:
    """Why the fast engine does not run these layers with the fused native kernels
    (`ucai.native_decode`; None: it does). They compute a Llama layer (RMSNorm,
    SiLU-gated MLP, rotary attention) on CPU tensors of one dtype, and the engine uses
    them in bfloat16 only: there they round as PyTorch's ops and flash attention do.
    In float32 they sum in another order than PyTorch's kernels, which on the tiny test
    model moves the log-probs a little further from the forward than ``generate``'s
    (mean |Δ| 8.5e-8 against 6.4e-8, greedy ids identical), so float32 keeps the
    PyTorch ops, as autocast does to any other dtype."""
    if dtype != torch.bfloat16:
        return f"{dtype} (the kernels are used in bfloat16)"
    if not bf16_kernels_faithful_here():
        return "a CPU without native bf16 (there the kernels drift further than generate)"
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != dtype:
        return f"autocast to {torch.get_autocast_dtype('cpu')} over {dtype} weights"
    if getattr(base.config, "hidden_act", None) != "silu":
        return f"activation {getattr(base.config, 'hidden_act', None)!r}"
    if getattr(base.config, "_attn_implementation", "sdpa") != "sdpa":
        # The kernel rounds as the flash kernel SDPA runs; eager attention rounds the
        # normalised weights instead, so its forward is not the one it follows.
        return f"attention implementation {base.config._attn_implementation!r}"
    projections = [p for layer in layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    if not all(p.fusible for p in projections):
        return "projections other than plain or LoRA linear layers (quantised, DoRA)"
    weights = [decoder.norm.weight, decoder.embed_tokens.weight]
    weights += [n.weight for layer in layers for n in (layer.input_norm, layer.post_norm)]
    weights += [base.weight for p in projections for base in p.bases]
    if any(w.device.type != "cpu" or w.dtype != dtype for w in weights):
        return "weights of another dtype or device than the cache's"
    if not layers or layers[0].head_dim % 2 or base.config.num_attention_heads % base.config.num_key_value_heads:
        return "head layout"
    return None


class NativeLayers:
    """Every layer and the final norm of one step with the fused native kernels (see
    `FastDecode`): per layer the residual add and norm, the q/k/v matmul, rotary
    embedding with the cache write and attention, the output matmul, add and norm, the
    gate/up matmul, SiLU-times-up and the down matmul. The residual stream is updated in
    place; the model's attention function is not used.

    One instance serves one generation: its first step checks every tensor handed to
    the kernels and that each fused weight is current, later steps (the same code, the
    same layouts, the same weights) skip those checks.
    """

    def __init__(self, kernels, layers: list[_Layer], final_norm: nn.Module):
        self.kernels, self.layers, self.final_norm = kernels, layers, final_norm
        self._checked = False

    def __call__(self, hidden, cos_sin, keys, values, length: int, mask, attention=None) -> torch.Tensor:
        """hidden: (B, 1, H) -> normed (B, 1, H); keys/values: per layer (B, KVH, capacity, D);
        mask: (B, 1, 1, length) additive, or None."""
        kernels, check = self.kernels, not self._checked
        batch = hidden.shape[0]
        hidden = hidden.reshape(batch, -1).clone()  # (B, H), updated in place below
        cos, sin_signed = (t.reshape(batch, -1).contiguous() for t in cos_sin)  # (B, D)
        mask_rows = None if mask is None else mask.reshape(batch, -1)  # (B, length), rows contiguous
        normed = torch.empty_like(hidden)
        delta = None
        for layer, layer_keys, layer_values in zip(self.layers, keys, values, strict=True):
            kernels.add_rms_norm(hidden, delta, layer.input_norm.weight, layer.input_norm.variance_epsilon, normed, check)
            q, k, v = layer.qkv(normed, refresh=check)  # (B, H_q * D), (B, KVH * D) x 2
            attended = q.new_empty(q.shape)
            kernels.rope_attention(
                q, k, v, cos, sin_signed, layer_keys, layer_values, mask_rows, attended, length, layer.attn.scaling,
                check,
            )
            delta = layer.o(attended, refresh=check)[0].contiguous()
            kernels.add_rms_norm(hidden, delta, layer.post_norm.weight, layer.post_norm.variance_epsilon, normed, check)
            gate, up = layer.gate_up(normed, refresh=check)
            activated = gate.new_empty(gate.shape)
            kernels.silu_mul(gate, up, activated, check)
            delta = layer.down(activated, refresh=check)[0].contiguous()
        kernels.add_rms_norm(hidden, delta, self.final_norm.weight, self.final_norm.variance_epsilon, normed, check)
        self._checked = True
        return normed.view(batch, 1, -1)


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


# --------------------------------------------------------------------------- registry

ENGINES: dict[str, Callable[[], GenerationEngine]] = {
    "hf": HFGenerate,
    "decode_loop": DecodeLoop,
    "fast": FastDecode,
}
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


def engine_version(name: str) -> str:
    """What generated with ``generation.engine: name`` (for ``auto``, every engine it
    may pick): the key under which generated text may be cached."""
    names = ("fast", "hf") if name == "auto" else (name,)
    return ",".join(f"{n}={getattr(engine_named(n), 'version', '?')}" for n in names)


def select_engine(name: str, model, synced_gpus: bool = False) -> GenerationEngine:
    """The engine to run: ``name``, or for ``auto`` the fast decode engine where it
    applies.

    ``auto`` falls back to ``hf`` (logged once per reason) for models the decode engines
    do not support and under FSDP (``synced_gpus``); a named engine that cannot run
    the model is an error.
    """
    if name != "auto":
        engine = engine_named(name)
        reason = engine.unsupported(model)
        if reason is not None:
            from ucai.errors import UcaiError

            raise UcaiError(f"generation engine {name!r} cannot run this model: {reason}; use engine: auto or hf")
        return engine
    fast = engine_named("fast")
    reason = "FSDP (ranks must step together)" if synced_gpus else fast.unsupported(model)
    if reason is None:
        return fast
    if (type(model).__name__, reason) not in _fallbacks_logged:
        _fallbacks_logged.add((type(model).__name__, reason))
        log.info("generation: using transformers generate (the decode loop does not support %s)", reason)
    return engine_named("hf")
