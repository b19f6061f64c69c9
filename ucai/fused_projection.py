"""Several linear layers that read the same input, run as one matmul (`FusedProjection`),
their weights fused and, on CPU, pre-packed for oneDNN: the projections of the decode
loop in `ucai.generation_engine` (q/k/v, gate/up, each other projection, the output
head). A peft LoRA layer's base layer is fused like a plain one and its adapter output
added exactly as peft adds it (`lora_output`).
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from ucai.hardware import cpu_bf16_is_native
from ucai.native_decode import cpu_has_tiles, native_kernels

# Row counts up to which the AMX tile matmul is tried (`_tile_kernels`): a decode step's
# batch. Beyond 32 rows oneDNN sums in another order, and the exactness check (below)
# keeps oneDNN there.
TILE_MAX_ROWS = 32


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


def _packing_available(dtype: torch.dtype) -> bool:
    """Whether oneDNN can pre-pack weights of ``dtype`` here: bf16 needs its bf16
    kernels (an AVX2-only CPU has none, and the reorder op raises there)."""
    ops = getattr(torch.ops, "mkldnn", None)
    if not hasattr(ops, "_reorder_linear_weight") or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_bf16_is_native())


def _tile_kernels(rows: int, n: int, k: int):
    """The native kernels when their AMX bf16 tile matmul can run this projection
    (`NativeDecodeKernels.tile_linear`): up to `TILE_MAX_ROWS` rows, N % 16 == 0 and
    K % 32 == 0, on a CPU with AMX; None otherwise. Also None where the kernels cannot
    share PyTorch's threads (another OpenMP runtime): one thread of tiles is slower than
    oneDNN on all of them."""
    if rows > TILE_MAX_ROWS or not cpu_has_tiles():
        return None
    kernels = native_kernels()
    if kernels is None or not kernels.tiles_fit(n, k) or not kernels.tiles_ready():
        return None
    if not kernels.share_threads and torch.get_num_threads() > 1:
        return None
    return kernels


def _rows_of(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x: (..., K) -> (rows, K) in ``dtype`` with contiguous rows, as the tile matmul reads it."""
    flat = x.reshape(-1, x.shape[-1]).to(dtype)
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def _free_memory() -> int | None:
    """Bytes this process may still allocate: the machine's free memory, or less under
    a cgroup v2 memory limit (a container); None where neither can be read."""
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            used = int(open("/sys/fs/cgroup/memory.current").read())
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def fits_in_free_memory(modules: list[nn.Module], share: float = 0.25) -> bool:
    """Whether a copy of these modules' weights takes at most ``share`` of the memory
    free now (`_free_memory`; unknown: False, no copy)."""
    free = _free_memory()
    size = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    return free is not None and size <= share * free


def _same_up_to_rounding(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """float32 matmuls that sum in another order: equal within a few hundred ulps of
    the output's scale (a wrong kernel or layout misses by orders of magnitude)."""
    scale = expected.abs().max().clamp(min=1e-30)
    return bool(((got - expected).abs().max() <= 1e-4 * scale).item())


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
    real input and drops the packing if they differ. On a CPU with AMX, at up to
    `TILE_MAX_ROWS` rows, without a bias and with N % 16 == 0 and K % 32 == 0 (widths
    of Llama-family models), the weight is packed for the native tile
    matmul instead (`ucai.native_decode`: 1.6x oneDNN's packed matmul over a SmolLM2
    decode step's projections at 16 rows, two cores), kept only where its outputs equal
    ``F.linear``'s bit for bit on the real input, as they do where oneDNN runs AMX too.

    With ``pack_float32`` (the faithful engine, `FastDecode`) float32 weights are
    packed for oneDNN too. fp32 ``F.linear`` runs MKL's unpacked sgemm, which streams
    the weights of a decode step at ~60% of the read bandwidth a packed oneDNN matmul
    reaches (one core, 8 rows: 6.1 vs 9.8 GB/s; fp32 PPO rollouts spend most of their
    time there). `benchmarks/fp32_packing.py` times both by row count: on an AVX2-only
    CPU, one thread, packing won 1.22-1.25x at 8 rows and 1.05-1.11x at 16-32, lost
    3-6% at 64 rows, and at 96 rows won 2% in one run and lost 12% in the other; on
    two threads it won 1.08-1.63x everywhere. The two kernels sum in a
    different order, so the outputs differ by float32 rounding; each rebuild checks
    they agree to that and otherwise drops the packing. This holds a second copy of the
    weights.

    A copy is made only when it buys something: packing, or a cast the matmul would
    otherwise redo at every step. Otherwise (fp32 weights without autocast, or bf16
    where oneDNN cannot pack it) the layers' own weights are used one by one: fusing
    alone does not make fp32 faster on CPU, and it would hold a second copy of every
    weight.
    """

    # Seconds spent building fused and packed weights, over all instances: the engine's
    # warm-up, reported once per model by `DecodeLoop.generate`.
    build_seconds = 0.0

    def __init__(self, modules: list[nn.Module], pack_float32: bool = False):
        self.modules = modules
        self.pack_float32 = pack_float32
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
        self._tiles: torch.Tensor | None = None  # the fused weight in the tile matmul's layout
        self._tile_kernels = None
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
        exact = dtype == torch.bfloat16  # packing must leave every output unchanged
        packable = (exact or (dtype == torch.float32 and self.pack_float32)) and _packing_available(dtype)
        self._direct = dtype == weights[0].dtype and not packable
        self._tiles = self._tile_kernels = None
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
            if exact and self._bias is None and self._try_tiles(x, rows):
                packable = False
            if packable:
                packed = torch.ops.mkldnn._reorder_linear_weight(self._weight, rows)
                flat = x.reshape(rows, -1).to(dtype)
                got, plain = self._packed_linear(flat, packed), F.linear(flat, self._weight, self._bias)
                if torch.equal(got, plain) if exact else _same_up_to_rounding(got, plain):
                    # The packed copy is all the loop needs: not holding the plain fused
                    # one as well saves a copy of the weights.
                    self._packed, self._weight = packed, None
                elif dtype == weights[0].dtype:
                    # A copy in the weights' own dtype buys nothing unpacked.
                    self._direct, self._weight, self._bias = True, None, None
        self._key = key
        FusedProjection.build_seconds += time.perf_counter() - start

    def _try_tiles(self, x: torch.Tensor, rows: int) -> bool:
        """Hold the fused bf16 weight in the tile matmul's layout instead, if the tile
        matmul runs here and gives ``F.linear``'s outputs bit for bit on ``x``."""
        kernels = _tile_kernels(rows, *self._weight.shape)
        if kernels is None:
            return False
        tiles = kernels.pack_tiles(self._weight)
        flat = _rows_of(x, self._dtype)
        if not torch.equal(kernels.tile_linear(flat, tiles, self._weight.shape[0]), F.linear(flat, self._weight)):
            return False
        self._tiles, self._tile_kernels, self._weight = tiles, kernels, None
        return True

    @property
    def holds_copy(self) -> bool:
        """Whether the last call ran on a fused (and possibly packed) copy of the weights."""
        return self._weight is not None or self._packed is not None or self._tiles is not None

    @property
    def uses_tiles(self) -> bool:
        """Whether the last call ran the native tile matmul."""
        return self._tiles is not None

    def _packed_linear(self, flat: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(flat, packed, self._bias, "none", [], "")

    def __call__(self, x: torch.Tensor, refresh: bool = True) -> list[torch.Tensor]:
        """x: (..., H) -> one (..., out_i) tensor per layer.

        ``refresh=False`` skips the check that the weights, dtype and row count are
        those the fused weight was built for (~6 us a call): for the later steps of one
        generation, where none of them can change."""
        if not self.fusible:
            return [module(x) for module in self.modules]
        if refresh or self._key is None:
            self._refresh(x)
        if self._direct:
            pieces = [F.linear(x, base.weight, base.bias) for base in self.bases]
        else:
            if self._tiles is not None:
                flat = _rows_of(x, self._dtype)
                out = self._tile_kernels.tile_linear(flat, self._tiles, sum(self.sizes), check=refresh)
                out = out.view(*x.shape[:-1], -1)
            elif self._packed is not None:
                flat = x.reshape(-1, x.shape[-1]).to(self._dtype)
                out = self._packed_linear(flat, self._packed).view(*x.shape[:-1], -1)
            else:
                out = F.linear(x, self._weight, self._bias)
            pieces = out.split(self.sizes, dim=-1)
        return [
            piece if module is base else lora_output(module, x, piece)
            for piece, module, base in zip(pieces, self.modules, self.bases, strict=True)
        ]
