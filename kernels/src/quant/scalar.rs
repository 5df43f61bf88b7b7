//! Portable integer-dot kernel over the packed layout: the semantic twin of the SIMD tiles (same
//! quantized activations, same per-block formula) and the fallback on CPUs without them.

use std::ops::Range;

use half::f16;

use super::act::Acts;
use super::{group_block_offsets, OutPtr, QuantFormat, QuantMatrix, BLOCK_ELEMS, GROUP_ROWS, LINE};

/// Sixteen f16 scales stored side by side, as f32.
fn scales16(bytes: &[u8]) -> [f32; GROUP_ROWS] {
    let mut out = [0f32; GROUP_ROWS];
    for (o, h) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = f16::from_le_bytes([h[0], h[1]]).to_f32();
    }
    out
}

/// y[r, 16g + j] = Σ_b d[j,b] · dx[r,b] · Σ_i q[j,b,i] · qx[r,b,i] (+ m[j,b] · Σx[r,b] for Q4_1).
///
/// # Safety
/// As `QuantMatrix::run_range`: `y` covers `rows` of a `[_, out_features]` buffer and nobody else
/// writes the elements of these groups × rows.
pub(super) unsafe fn run(m: &QuantMatrix, a: &Acts, groups: Range<usize>, rows: Range<usize>, y: OutPtr) {
    let nb = m.nb;
    let bytes = m.bytes();
    let pb = m.format.payload_bytes();
    for g in groups {
        let grp = &bytes[g * m.group_stride..(g + 1) * m.group_stride];
        let valid = (m.out_features - g * GROUP_ROWS).min(GROUP_ROWS);
        for r in rows.clone() {
            let mut acc = [0f32; GROUP_ROWS];
            for b in 0..nb {
                let xi = r * nb + b;
                let xq = &a.q[xi * BLOCK_ELEMS..(xi + 1) * BLOCK_ELEMS];
                let (so, po) = group_block_offsets(m.format, b);
                let qp = &grp[po..po + GROUP_ROWS * pb];
                let mut isum = [0i32; GROUP_ROWS];
                for (k, vec) in qp.chunks_exact(LINE).enumerate() {
                    for (j, lane) in vec.chunks_exact(4).enumerate() {
                        for (t, &w) in lane.iter().enumerate() {
                            let e = 4 * k + t;
                            isum[j] += match m.format {
                                QuantFormat::Q4_1 => {
                                    (w & 0x0f) as i32 * xq[e] as i32 + (w >> 4) as i32 * xq[e + 16] as i32
                                }
                                // Stored as q ^ 0x80.
                                QuantFormat::Q8_0 => ((w ^ 0x80) as i8) as i32 * xq[e] as i32,
                            };
                        }
                    }
                }
                let sc = &grp[so..];
                let dw = scales16(&sc[..32]);
                match m.format {
                    QuantFormat::Q4_1 => {
                        let mw = scales16(&sc[32..64]);
                        for j in 0..GROUP_ROWS {
                            acc[j] += isum[j] as f32 * (dw[j] * a.d[xi]) + mw[j] * a.s[xi];
                        }
                    }
                    QuantFormat::Q8_0 => {
                        for j in 0..GROUP_ROWS {
                            acc[j] += isum[j] as f32 * (dw[j] * a.d[xi]);
                        }
                    }
                }
            }
            let dst = y.0.add(r * m.out_features + g * GROUP_ROWS);
            std::ptr::copy_nonoverlapping(acc.as_ptr(), dst, valid);
        }
    }
}
