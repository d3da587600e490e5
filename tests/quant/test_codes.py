"""NF4 / FP4 / int8 codes against bitsandbytes (the oracle), and NF4's error bound."""

from __future__ import annotations

import pytest
import torch

from tuneforge.quant.backends import _bnb
from tuneforge.quant.blockwise import block_absmax, dequantize_4bit, quantize_4bit, quantize_blockwise8
from tuneforge.quant.codebooks import code_4bit, code_dynamic8
from tuneforge.quant.int8 import dequantize_int8, quantize_int8

# bitsandbytes is a test dependency: the oracle for the codes
bnb_F = _bnb().functional

SHAPES = [(128, 64), (576, 1536), (33, 17), (1000,), (3, 5, 64)]


def _weights(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.02
    w.view(-1)[:64] = 0.0  # an all-zero block
    w.view(-1)[70] = 0.5  # an outlier
    return w


def test_tables_equal_bitsandbytes():
    assert torch.equal(code_4bit("nf4"), bnb_F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(code_4bit("fp4"), bnb_F.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(code_dynamic8(), bnb_F.create_dynamic_map())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_4bit_codes_equal_bitsandbytes(shape, quant_type, dtype):
    w = _weights(shape).to(dtype)
    ref, state = bnb_F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=False)
    ours = quantize_4bit(w, 64, quant_type, double_quant=False)
    assert torch.equal(ours.data, ref)
    assert torch.equal(ours.absmax, state.absmax)
    # bitsandbytes' own kernel dequantizes our codes to the same values as ours
    assert torch.equal(dequantize_4bit(ours, dtype).view(-1), bnb_F.dequantize_4bit(ref, state).view(-1))


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_4bit_codes_equal_bitsandbytes_other_blocksizes(blocksize):
    w = _weights((96, 256), seed=1)
    ref, state = bnb_F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    ours = quantize_4bit(w, blocksize, "nf4", double_quant=False)
    assert torch.equal(ours.data, ref) and torch.equal(ours.absmax, state.absmax)


def test_double_quantization_matches_bitsandbytes():
    w = _weights((2048, 512), seed=2)
    ref, state = bnb_F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quantize_4bit(w, 64, "nf4", double_quant=True)
    assert torch.equal(ours.data, ref)  # the 4-bit codes do not depend on how absmax is stored
    assert torch.equal(ours.offset, state.offset)
    assert torch.equal(ours.nested_absmax, state.state2.absmax)
    assert ours.absmax.dtype == torch.uint8 and ours.absmax.shape == state.absmax.shape
    # bitsandbytes' CPU 8-bit kernel rounds a few values near a midpoint to the farther code; ours
    # always takes the nearest (as its CUDA and reference kernels do): equal almost everywhere,
    # and never farther from the true absmax
    same = (ours.absmax == state.absmax).float().mean().item()
    assert same > 0.99, same
    true = w.view(-1, 64).abs().amax(1) - state.offset
    codes = code_dynamic8()
    scale = ours.nested_absmax.repeat_interleave(256)[: true.numel()]
    err_ours = (codes[ours.absmax.long()] * scale - true).abs()
    err_bnb = (codes[state.absmax.long()] * scale - true).abs()
    assert bool((err_ours <= err_bnb + 1e-12).all())


def test_blockwise8_is_nearest_code():
    x = torch.randn(5000)
    codes, absmax = quantize_blockwise8(x)
    table = code_dynamic8()
    scaled = x.view(-1)[:4864].view(-1, 256) / absmax[:19].unsqueeze(1)
    dist = (scaled.reshape(-1, 1) - table.view(1, -1)).abs()
    chosen = dist.gather(1, codes.view(-1)[:4864].long().view(-1, 1)).view(-1)
    assert torch.allclose(chosen, dist.min(1).values, atol=1e-7)


def test_nf4_error_bound():
    """Each value lands within half the widest NF4 gap (times its block's absmax) of itself."""
    w = torch.randn(4096, 256) * 0.02
    q = quantize_4bit(w, 64, "nf4", double_quant=False)
    err = (dequantize_4bit(q) - w).abs().view(-1, 64)
    code = code_4bit("nf4")
    half_gap = (code[1:] - code[:-1]).max() / 2
    assert bool((err <= half_gap * q.absmax.unsqueeze(1) + 1e-7).all())
    # and on Gaussian weights the mean error is far below that worst case (about 0.1 of absmax/2)
    rel = (err.mean(1) / q.absmax).mean().item()
    assert rel < 0.05, rel
    # double quantization changes each absmax by at most ~1 % here: the error stays close
    qd = quantize_4bit(w, 64, "nf4", double_quant=True)
    assert torch.allclose(block_absmax(qd), q.absmax, rtol=0.02, atol=1e-6)
    err_d = (dequantize_4bit(qd) - w).abs().mean().item()
    assert err_d < 1.05 * err.mean().item()


def test_dequantize_slices_equal_whole():
    q = quantize_4bit(torch.randn(64, 192), 64, "nf4", double_quant=True)
    whole = dequantize_4bit(q).view(-1)
    absmax = block_absmax(q)
    assert torch.equal(dequantize_4bit(q, start=192 * 5, stop=192 * 9, absmax=absmax), whole[192 * 5 : 192 * 9])
    with pytest.raises(ValueError, match="multiple of the blocksize"):
        dequantize_4bit(q, start=10)


def test_int8_codes_equal_bitsandbytes():
    w = _weights((300, 200), seed=3)
    w[5] = 0.0
    codes, row_absmax, _ = bnb_F.int8_vectorwise_quant(w)
    q = quantize_int8(w)
    assert torch.equal(q.data, codes) and torch.equal(q.absmax, row_absmax)
    err = (dequantize_int8(q) - w).abs()
    assert bool((err <= q.absmax.unsqueeze(1) / 127 / 2 + 1e-7).all())  # half a step per row
