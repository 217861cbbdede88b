"""Triton kernel of `float8_matmul`'s tokens-last copy. Imported only where a kernel runs (it imports triton).

A (rows, cols) byte matrix (float8 values viewed as uint8: the copy moves bytes, whatever their format) is
written transposed into a (cols, padded rows) matrix, the rows beyond the input's as zeros. Each program moves
one BLOCK_R x BLOCK_C tile: loads along the input's rows and stores along the output's rows are both
BLOCK_* bytes wide, and `tl.trans` turns the tile around in shared memory between them.
"""

import triton
import triton.language as tl


@triton.jit
def tokens_last_kernel(src_ptr, dst_ptr, rows, cols, padded_rows, stride_src,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r64 = r.to(tl.int64)
    c64 = c.to(tl.int64)
    tile = tl.load(src_ptr + r64[:, None] * stride_src + c64[None, :],
                   mask=(r < rows)[:, None] & (c < cols)[None, :], other=0)
    tl.store(dst_ptr + c64[:, None] * padded_rows + r64[None, :], tl.trans(tile),
             mask=(c < cols)[:, None] & (r < padded_rows)[None, :])
