"""The fast decode engine's fused CPU kernels (``ucai/native/decode_step.cpp``).

Between its matmuls a decode step of a small Llama runs ~25 PyTorch ops a layer on a
few kilobytes each, plus a flash-attention call built for long queries; at batch 16 on
CPU that is as much time as the matmuls (see the C++ file's header). The C++ file fuses
them into three calls a layer: `NativeDecodeKernels.add_rms_norm` (residual add and
the next norm), `rope_attention` (rotary embedding, cache write and one-row
attention) and `silu_mul`. On a CPU with AMX bf16, `tile_linear` runs the step's
projections (`ucai.fused_projection` uses it where its outputs equal oneDNN's).

The source is compiled on first use with the system's C++ compiler (``$CXX`` or
``c++``) for this CPU (``-march=native``) into ``$UCAI_CACHE/kernels`` (about 2 s),
keyed on the source, the compiler, the flags and the CPU's instruction sets, written
atomically so that parallel stages can compile at once, and loaded with ctypes (no
PyTorch headers, so no multi-minute extension build). Without a compiler, or with
``UCAI_NATIVE_KERNELS=0``, `native_kernels` returns None with one log line, and the
engine keeps its PyTorch ops.

Each wrapper checks dtypes, devices, shapes and layouts before it hands raw pointers
over (a mismatch raises instead of reading the wrong memory), unless called with
``check=False``: the decode loop checks a generation's first step and skips the checks
(~10 us a call, ~1.5 ms a SmolLM2 step) on later steps, whose tensors come from the same
code with the same layouts. Bounds that change per step are always checked.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ucai.models import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "native" / "decode_step.cpp"
# -ffp-contract=off: a * b + c rounds twice, as PyTorch's separate ops do (the kernels'
# explicit fused multiply-adds stay fused). 512-bit vectors on x86 (GCC tunes some
# AVX-512 CPUs for 256).
FLAGS = (
    "-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC",
    "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
    *(("-mprefer-vector-width=512",) if platform.machine().lower() in ("x86_64", "amd64") else ()),
)
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
DTYPES = tuple(_SUFFIX)

_p, _i, _i64, _f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "add_rms_norm": (_p, _p, _p, _f, _p, _i, _i),
    "silu_mul": (_p, _i64, _p, _i64, _p, _i, _i, _i),
    "rope_attention": (
        _p, _i64, _p, _i64, _p, _i64, _p, _p, _p, _p, _p, _i64, _p, _i, _i, _i, _i, _i, _i, _i, _f, _i,
    ),
}
# The bf16 tile matmul (AMX), built only for a CPU that has it.
_TILE_SIGNATURES = {
    "ucai_tiles_built": ((), _i),
    "ucai_tiles_request": ((), _i),
    "ucai_tiles_pack_bf16": ((_p, _i, _i, _p), None),
    "ucai_tiles_linear_bf16": ((_p, _i64, _i, _i, _p, _i, _p, _i64, _i), None),
}


def _cpu_flags() -> str:
    """The CPU's instruction sets (``-march=native`` compiles for them)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_tiles() -> bool:
    """Whether this CPU reports AMX bf16 (the tile matmul is built only for such a CPU):
    checked before compiling anything for it."""
    return "amx_bf16" in _cpu_flags().split()


def _library_path(compiler: list[str]) -> Path:
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(
        b"\0".join(x.encode() for x in (SOURCE.read_text(), version, " ".join(FLAGS), _cpu_flags()))
    ).hexdigest()[:16]
    return cache_dir() / "kernels" / f"decode_step-{key}.so"


def _compile(compiler: list[str], target: Path) -> None:
    """Compile the source to ``target`` atomically (another process may do the same)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(handle)
    try:
        result = subprocess.run(
            [*compiler, *FLAGS, str(SOURCE), "-o", temporary], capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            first = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip())
            raise RuntimeError(f"{' '.join(compiler)} failed: {first[:300]}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _check(tensor: torch.Tensor, dtype: torch.dtype, name: str, rows: int | None = None, width: int | None = None):
    """A CPU tensor of ``dtype`` whose rows are contiguous: (rows, width) with any row stride."""
    if tensor.device.type != "cpu" or tensor.dtype != dtype or tensor.dim() != 2 or tensor.stride(1) != 1:
        raise ValueError(
            f"native decode kernel: {name} must be a 2-D CPU {dtype} tensor with contiguous rows, "
            f"got {tuple(tensor.shape)} {tensor.dtype} strides {tensor.stride()} on {tensor.device}"
        )
    if (rows is not None and tensor.shape[0] != rows) or (width is not None and tensor.shape[1] != width):
        raise ValueError(f"native decode kernel: {name} has shape {tuple(tensor.shape)}, expected ({rows}, {width})")


def _openmp_runtimes() -> set[str] | None:
    """The OpenMP runtime libraries mapped into this process (None where that cannot
    be read: not Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    names = ("libgomp", "libiomp", "libomp")
    return {line.split()[-1] for line in maps.splitlines() if any(n in line.rsplit("/", 1)[-1] for n in names)}


def _shares_one_openmp_runtime(before: set[str] | None, after: set[str] | None) -> bool:
    """Whether the kernels' parallel loops run on PyTorch's own OpenMP pool: loading
    them added no second runtime (PyTorch's Linux wheels ship libgomp under the
    library's standard name, which the kernels link). Otherwise (a renamed or another
    runtime, e.g. Intel's or LLVM's) they run single-threaded rather than start a second
    pool that would spin against the first for the cores."""
    return before is not None and after is not None and len(after) == 1 and after == before


class NativeDecodeKernels:
    """ctypes bindings of the compiled kernels; every tensor argument is checked."""

    def __init__(self, library: ctypes.CDLL, path: Path, share_threads: bool = True):
        self.path = path
        self.share_threads = share_threads
        self._functions = {}
        for dtype, suffix in _SUFFIX.items():
            for name, arguments in _SIGNATURES.items():
                function = getattr(library, f"ucai_{name}_{suffix}")
                function.argtypes, function.restype = arguments, None
                self._functions[name, dtype] = function
        for name, (arguments, result) in _TILE_SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes, function.restype = arguments, result
            self._functions[name] = function
        self._tiles_granted_in: int | None = None  # the process the tile state was granted to

    def add_rms_norm(
        self,
        hidden: torch.Tensor,
        delta: torch.Tensor | None,
        weight: torch.Tensor,
        eps: float,
        normed: torch.Tensor,
        check: bool = True,
    ) -> None:
        """In place: ``hidden += delta`` (bf16 rounding as PyTorch's add), then
        ``normed = weight * rms_norm(hidden)`` as LlamaRMSNorm computes it.

        hidden, delta, normed: (B, H) contiguous; weight: (H,).
        """
        rows, width = hidden.shape
        dtype = hidden.dtype
        if check:
            for name, tensor in (("hidden", hidden), ("normed", normed), ("delta", delta)):
                if tensor is not None:
                    _check(tensor, dtype, name, rows, width)
                    if not tensor.is_contiguous():
                        raise ValueError(f"native decode kernel: {name} must be contiguous")
            _check(weight.view(1, -1), dtype, "norm weight", 1, width)
        self._functions["add_rms_norm", dtype](
            hidden.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(), eps,
            normed.data_ptr(), rows, width,
        )

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor, check: bool = True) -> None:
        """``out = silu(gate) * up``, each op rounded as PyTorch's.

        gate, up: (B, I) with contiguous rows (views of a fused matmul's output); out: (B, I) contiguous.
        """
        rows, width = out.shape
        dtype = out.dtype
        if check:
            _check(gate, dtype, "gate", rows, width)
            _check(up, dtype, "up", rows, width)
            _check(out, dtype, "out", rows, width)
            if not out.is_contiguous():
                raise ValueError("native decode kernel: out must be contiguous")
        self._functions["silu_mul", dtype](
            gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0), out.data_ptr(), rows, width,
            self.threads(),
        )

    def rope_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin_signed: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None,
        out: torch.Tensor,
        length: int,
        scale: float,
        check: bool = True,
    ) -> None:
        """One step of attention for every row, the new token at cache position ``length - 1``.

        Rotates q and k (``x * cos + rotate_half(x) * sin``), writes the new key and value
        into the caches, and attends over positions ``[0, length)``.

        Args:
            q: (B, heads * D); k, v: (B, kv_heads * D), rows contiguous.
            cos, sin_signed: (B, D) rotary tables (sin with its first half negated).
            keys, values: (B, kv_heads, capacity, D) contiguous caches.
            mask: (B, >= length) additive mask (0 or -inf) with contiguous rows, or None.
            out: (B, heads * D) contiguous, written.
        """
        batch, kv_heads, capacity, dim = keys.shape
        dtype, heads = keys.dtype, q.shape[1] // dim
        if not 1 <= length <= capacity or (mask is not None and mask.shape[1] < length):
            raise ValueError(f"native decode kernel: length {length} outside the cache ({capacity}) or the mask")
        if check:
            self._check_attention(q, k, v, cos, sin_signed, keys, values, mask, out)
        self._functions["rope_attention", dtype](
            q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
            cos.data_ptr(), sin_signed.data_ptr(), keys.data_ptr(), values.data_ptr(),
            None if mask is None else mask.data_ptr(), 0 if mask is None else mask.stride(0),
            out.data_ptr(), batch, heads, kv_heads, dim, capacity, length - 1, length, scale,
            self.threads(),
        )

    def tiles_ready(self) -> bool:
        """Whether `tile_linear` runs here: the library was built for a CPU with AMX
        bf16 and Linux granted this process the tile state (asked once per process, as
        a forked stage is a new one)."""
        if self._tiles_granted_in == os.getpid():
            return True
        if not self._functions["ucai_tiles_built"]() or self._functions["ucai_tiles_request"]() != 0:
            return False
        self._tiles_granted_in = os.getpid()
        return True

    @staticmethod
    def tiles_fit(n: int, k: int) -> bool:
        """Whether a (n, k) weight has the shape the tile matmul takes."""
        return n % 16 == 0 and k % 32 == 0 and n > 0 and k > 0

    def pack_tiles(self, weight: torch.Tensor) -> torch.Tensor:
        """weight: (N, K) bf16 -> its tile layout for `tile_linear`, (N * K,) bf16."""
        n, k = weight.shape
        if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or not self.tiles_fit(n, k):
            raise ValueError(
                f"native tile matmul: needs a CPU bf16 weight with N % 16 == 0 and K % 32 == 0, "
                f"got {tuple(weight.shape)} {weight.dtype} on {weight.device}"
            )
        weight = weight.contiguous()
        packed = torch.empty(n * k, dtype=torch.bfloat16)
        self._functions["ucai_tiles_pack_bf16"](weight.data_ptr(), n, k, packed.data_ptr())
        return packed

    def tile_linear(self, x: torch.Tensor, packed: torch.Tensor, n: int, check: bool = True) -> torch.Tensor:
        """x: (M, K) bf16 with contiguous rows, packed: `pack_tiles` of a (n, K) weight
        -> (M, n) bf16, ``x @ weight.T`` with float32 sums rounded once."""
        m, k = x.shape
        if check:
            _check(x, torch.bfloat16, "x")
            if packed.numel() != n * k or packed.dtype != torch.bfloat16 or not self.tiles_fit(n, k):
                raise ValueError(f"native tile matmul: packed weight of {packed.numel()} values for ({n}, {k})")
            if not self.tiles_ready():
                raise RuntimeError("native tile matmul: not available on this CPU or process")
        out = torch.empty((m, n), dtype=torch.bfloat16)
        self._functions["ucai_tiles_linear_bf16"](
            x.data_ptr(), x.stride(0), m, k, packed.data_ptr(), n, out.data_ptr(), n, self.threads()
        )
        return out

    def threads(self) -> int:
        """Threads for the kernels' parallel loops: PyTorch's, when its pool is theirs."""
        return torch.get_num_threads() if self.share_threads else 1

    @staticmethod
    def _check_attention(q, k, v, cos, sin_signed, keys, values, mask, out) -> None:
        batch, kv_heads, capacity, dim = keys.shape
        dtype = keys.dtype
        heads = q.shape[1] // dim
        if not (keys.is_contiguous() and values.is_contiguous() and values.shape == keys.shape):
            raise ValueError("native decode kernel: keys and values must be contiguous caches of one shape")
        if keys.device.type != "cpu" or values.device.type != "cpu" or values.dtype != dtype:
            raise ValueError("native decode kernel: keys and values must be CPU tensors of one dtype")
        if heads * dim != q.shape[1] or heads % kv_heads or dim % 2:
            raise ValueError(
                f"native decode kernel: {q.shape[1]} query features in heads of {dim} over {kv_heads} key/value heads"
            )
        _check(q, dtype, "q", batch, heads * dim)
        _check(k, dtype, "k", batch, kv_heads * dim)
        _check(v, dtype, "v", batch, kv_heads * dim)
        for name, table in (("cos", cos), ("sin", sin_signed)):
            _check(table, dtype, name, batch, dim)
            if not table.is_contiguous():
                raise ValueError(f"native decode kernel: {name} must be contiguous")
        _check(out, dtype, "out", batch, heads * dim)
        if not out.is_contiguous():
            raise ValueError("native decode kernel: out must be contiguous")
        if mask is not None:
            _check(mask, dtype, "mask", batch)


@functools.cache
def native_kernels() -> NativeDecodeKernels | None:
    """The compiled kernels, compiling them on first use; None (logged once) where they
    cannot be built or ``UCAI_NATIVE_KERNELS=0`` turns them off."""
    if os.environ.get("UCAI_NATIVE_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        log.info("generation: native decode kernels turned off (UCAI_NATIVE_KERNELS=0)")
        return None
    compiler = shlex.split(os.environ.get("CXX") or "c++")  # e.g. "ccache g++"
    if not compiler or shutil.which(compiler[0]) is None:
        log.info("generation: no C++ compiler (%s) for the native decode kernels; using PyTorch ops", compiler)
        return None
    try:
        path = _library_path(compiler)
        if not path.exists():
            _compile(compiler, path)
            log.info("generation: compiled the native decode kernels into %s", path)
        before = _openmp_runtimes()
        try:
            library = ctypes.CDLL(str(path))
        except OSError:  # a stale or foreign build in a shared cache: build it again
            _compile(compiler, path)
            library = ctypes.CDLL(str(path))
        return NativeDecodeKernels(library, path, _shares_one_openmp_runtime(before, _openmp_runtimes()))
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as error:
        log.info("generation: native decode kernels unavailable (%s); using PyTorch ops", error)
        return None
