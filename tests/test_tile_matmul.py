"""The native bf16 tile matmul (AMX) of the decode engine's projections: its weight
layout by hand, its sums against float32, its input checks, and `FusedProjection`
keeping it only where it gives ``F.linear``'s outputs bit for bit."""

from __future__ import annotations

import pytest
import torch

from ucai import fused_projection
from ucai.fused_projection import FusedProjection
from ucai.native_decode import native_kernels

KERNELS = native_kernels()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason="the native kernels could not be built (no C++ compiler?)")
needs_tiles = pytest.mark.skipif(
    KERNELS is None or not KERNELS.tiles_ready(), reason="no AMX bf16 tiles on this CPU (oneDNN runs instead)"
)


def bf16(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@needs_kernels
def test_tile_layout_by_hand():
    """[N/16 blocks][K/32 slices][16 pairs of K][16 columns][2]: one 1 KiB VNNI tile
    per (block, slice)."""
    weight = bf16(32, 64)
    packed = KERNELS.pack_tiles(weight)
    assert packed.shape == (32 * 64,)
    # block 1, slice 1, pair 3, column 5, second of the pair: (1 * 2 + 1) * 512 + 3 * 32 + 5 * 2 + 1
    assert packed[1643] == weight[1 * 16 + 5, 1 * 32 + 3 * 2 + 1]
    assert packed[0] == weight[0, 0] and packed[1] == weight[0, 1] and packed[2] == weight[1, 0]
    assert packed[32] == weight[0, 2]  # the next pair of K starts the tile's second row
    expected = weight.view(2, 16, 2, 16, 2).permute(0, 2, 3, 1, 4).reshape(-1)
    assert torch.equal(packed, expected)


@needs_kernels
def test_tile_inputs_are_checked():
    with pytest.raises(ValueError, match=r"N % 16 == 0 and K % 32 == 0, got \(24, 64\)"):
        KERNELS.pack_tiles(bf16(24, 64))
    with pytest.raises(ValueError, match="got \\(32, 48\\)"):
        KERNELS.pack_tiles(bf16(32, 48))
    with pytest.raises(ValueError, match="float32"):
        KERNELS.pack_tiles(torch.zeros(32, 64))
    packed = KERNELS.pack_tiles(bf16(32, 64))
    with pytest.raises(ValueError, match="packed weight of 2048 values for \\(16, 64\\)"):
        KERNELS.tile_linear(bf16(4, 64), packed, 16)
    with pytest.raises(ValueError, match="x must be a 2-D CPU torch.bfloat16"):
        KERNELS.tile_linear(bf16(4, 64).float(), packed, 32)


@needs_tiles
@pytest.mark.parametrize(
    "rows,n,k",
    [
        (1, 16, 32),  # one tile of each
        (5, 80, 64),  # a partial row tile; a last group of one column block (80 = 64 + 16)
        (16, 960, 576),  # SmolLM2's q/k/v at batch 16
        (20, 48, 96),  # two row tiles, the second partial; a group of three blocks
        (32, 576, 1536),  # SmolLM2's down projection at batch 32
    ],
)
def test_tile_linear_sums_in_float32_and_rounds_once(rows, n, k):
    weight = bf16(n, k, seed=1)
    wide = bf16(rows, k + 32, seed=2)
    x = wide[:, 16 : 16 + k]  # rows with a stride wider than K
    out = KERNELS.tile_linear(x, KERNELS.pack_tiles(weight), n)
    exact = x.double() @ weight.double().T
    assert out.shape == (rows, n) and out.dtype == torch.bfloat16
    # float32 sums in another order than float64: at most one bf16 step from the
    # exact product rounded once (a wrong layout or stride misses by whole values).
    spacing = torch.exp2(torch.floor(torch.log2(exact.abs().clamp(min=1e-30))) - 7)
    assert ((out.double() - exact).abs() <= spacing * 1.01).all()
    assert (out == exact.to(torch.bfloat16)).float().mean() > 0.99
    # Threads split the column blocks only: three threads (the suite runs on one) give
    # the same bits, every block written once.
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert torch.equal(KERNELS.tile_linear(x, KERNELS.pack_tiles(weight), n), out)
    finally:
        torch.set_num_threads(threads)


def bf16_layers(*sizes, width=64, bias=False):
    torch.manual_seed(0)
    return [torch.nn.Linear(width, n, bias=bias).to(torch.bfloat16) for n in sizes]


def assert_matches_layers(fused, layers, x):
    for out, layer in zip(fused(x), layers, strict=True):
        assert torch.equal(out, layer(x))


@needs_tiles
def test_fused_projection_runs_the_tile_matmul_where_it_is_exact():
    layers = bf16_layers(32, 16, 16)
    fused = FusedProjection(layers)
    x = bf16(16, 1, 64, seed=3)
    assert_matches_layers(fused, layers, x)
    assert fused.uses_tiles and fused.holds_copy and fused._weight is None and fused._packed is None
    with torch.no_grad():
        layers[1].weight.mul_(2.0)  # a weight changed in place: repacked
    assert_matches_layers(fused, layers, x)
    assert fused.uses_tiles


@needs_tiles
def test_fused_projection_takes_inputs_whose_features_are_not_contiguous():
    layers = bf16_layers(32, 16)
    fused = FusedProjection(layers)
    x = bf16(64, 8, seed=6).T[:, None, :]  # (8, 1, 64), features 8 elements apart
    assert_matches_layers(fused, layers, x)
    assert fused.uses_tiles
    for out, layer in zip(fused(x, refresh=False), layers, strict=True):  # the later steps' path
        assert torch.equal(out, layer(x))


@needs_tiles
def test_without_shared_threads_oneDNN_keeps_the_projections(monkeypatch):
    """Under another OpenMP runtime the kernels run on one thread; oneDNN, on all of
    them, is then faster than the tiles."""
    kernels = native_kernels()
    monkeypatch.setattr(kernels, "share_threads", False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        layers = bf16_layers(32, 16)
        fused = FusedProjection(layers)
        assert_matches_layers(fused, layers, bf16(8, 1, 64, seed=7))
        assert not fused.uses_tiles
    finally:
        torch.set_num_threads(threads)


@needs_tiles
def test_fused_projection_keeps_onednn_where_the_tiles_would_change_an_output(monkeypatch):
    """Where the tile matmul's bits differ from ``F.linear``'s (another oneDNN, more
    rows), the outputs must not change: oneDNN's packed matmul runs instead."""
    layers = bf16_layers(32, 32)
    x = bf16(16, 1, 64, seed=4)
    kernels = native_kernels()  # the instance FusedProjection gets (another test may have rebuilt the cache)
    real = kernels.tile_linear

    def one_ulp_off(x, packed, n, check=True):
        out = real(x, packed, n, check)
        out.view(torch.int16)[0, 0] += 1
        return out

    monkeypatch.setattr(kernels, "tile_linear", one_ulp_off)
    fused = FusedProjection(layers)
    assert_matches_layers(fused, layers, x)
    assert not fused.uses_tiles and fused._packed is not None


@needs_tiles
@pytest.mark.parametrize("case", ["more rows", "bias", "width not a multiple of 16"])
def test_fused_projection_keeps_onednn_outside_the_tile_shapes(case):
    rows = fused_projection.TILE_MAX_ROWS + 1 if case == "more rows" else 8
    sizes = {"more rows": (40, 24), "bias": (40, 8), "width not a multiple of 16": (40, 4)}[case]  # 64, 48, 44
    layers = bf16_layers(*sizes, bias=case == "bias")
    fused = FusedProjection(layers)
    assert_matches_layers(fused, layers, bf16(rows, 1, 64, seed=5))
    assert not fused.uses_tiles


@needs_tiles
def test_the_fast_engine_runs_every_projection_on_tiles_with_the_same_tokens(tiny_tokenizer, monkeypatch):
    """tiny-llama in bf16 (projections 64 to 256 wide over 64 or 128 inputs and the
    49,152-token head all fit the tiles): every projection of the decode loop runs the tile matmul, and the greedy
    tokens are those of oneDNN's packed matmul, bit-identical outputs giving identical
    choices."""
    from ucai.generation_engine import FastDecode
    from ucai.models import load_causal_lm
    from ucai.stages.generation import GenerationSettings

    model = load_causal_lm("tiny-llama", dtype=torch.bfloat16, seed=3).eval()
    tiny_tokenizer.padding_side = "left"
    encoded = tiny_tokenizer(["a red team prompt", "b"] * 4, return_tensors="pt", padding=True)
    settings = GenerationSettings(max_new_tokens=12, do_sample=False)

    def generate():
        engine = FastDecode()
        tokens = engine.generate(
            model, encoded["input_ids"], encoded["attention_mask"], settings, [], tiny_tokenizer.pad_token_id
        )
        layers, head = next(iter(engine._layers.values()))[1:]
        projections = [p for layer in layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)] + [head]
        return tokens, projections

    tiled, projections = generate()
    assert all(p.uses_tiles for p in projections)
    monkeypatch.setattr(fused_projection, "TILE_MAX_ROWS", 0)
    plain, projections = generate()
    assert not any(p.uses_tiles for p in projections) and all(p._packed is not None for p in projections)
    assert torch.equal(tiled, plain)
