//! SIMD backends for the attention tile kernels: one trait, three implementations
//! (AVX-512F, AVX2+FMA, portable), each with its own register blocking.
//!
//! The generic kernels in `kernel.rs` are written once against [`Simd`] and marked
//! `#[inline(always)]`; they are instantiated inside `#[target_feature]` entry points, where the
//! intrinsics behind the trait methods inline into straight vector code. A backend value is a
//! token: it can only be obtained after the CPU feature was detected, which is what makes the
//! `unsafe` intrinsic calls behind the safe-looking methods sound.

use super::kernel::{pv_tile_impl, qk_tile_impl, TILE};

/// Vector operations the attention kernels need, plus the two register-blocked tile kernels
/// (whose block shapes depend on the register file of the backend).
pub(super) trait Simd: Copy {
    /// f32 lanes per vector; divides [`TILE`].
    const LANES: usize;
    type V: Copy;

    fn zero(self) -> Self::V;
    fn splat(self, x: f32) -> Self::V;
    /// # Safety
    /// `p` must be valid for reading `LANES` floats.
    unsafe fn load(self, p: *const f32) -> Self::V;
    /// # Safety
    /// `p` must be valid for writing `LANES` floats.
    unsafe fn store(self, p: *mut f32, v: Self::V);
    /// `a * b + c`.
    fn fma(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    fn max(self, a: Self::V, b: Self::V) -> Self::V;
    fn hmax(self, v: Self::V) -> f32;
    fn hsum(self, v: Self::V) -> f32;
    /// `e^x` per lane, within a few ulp; exactly 0 for `x` below `ln(f32::MIN_POSITIVE)` (so
    /// `-inf` maps to 0 and no denormals are produced).
    fn exp(self, x: Self::V) -> Self::V;
    /// Hint that the cache line holding `p` will be read soon (no-op where unsupported).
    fn prefetch(self, p: *const f32);

    /// `s[i][t] = sum_k q[i][k] * K^T[k][t]` for `i < nq`, `t < TILE`: `q` rows have stride `d`,
    /// `s` rows stride `TILE`; key vector `j` (lanes `j*LANES..`) is read at `kp[j] + k*kstride`.
    /// `pf` is empty or has one pointer per key vector of the next tile (same stride), whose
    /// lines are prefetched along the way.
    ///
    /// # Safety
    /// All pointers valid for the described extents; `kp.len() == TILE / LANES`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn qk_tile(
        self,
        q: *const f32,
        nq: usize,
        d: usize,
        kp: &[*const f32],
        kstride: usize,
        pf: &[*const f32],
        s: *mut f32,
    );

    /// `o[i][..d] += sum_t p[i][t] * V[t][..d]` for `i < nq`, `t < vp.len()`: `p` rows have
    /// stride `TILE`, `o` rows stride `d`, `vp[t]` points at the `d` values of key `t`. The rows
    /// at `pf` (the next tile's, any number) are prefetched along the way.
    ///
    /// # Safety
    /// All pointers valid for the described extents; `vp.len() <= TILE`.
    unsafe fn pv_tile(
        self,
        p: *const f32,
        nq: usize,
        vp: &[*const f32],
        pf: &[*const f32],
        d: usize,
        o: *mut f32,
    );
}

/// Cephes `expf` constants: range reduction by `ln 2` split in two parts, then a degree-6
/// polynomial on `[-ln2/2, ln2/2]`.
const EXP_LO: f32 = -87.336_55; // ln(f32::MIN_POSITIVE): below this the result is flushed to 0
const EXP_HI: f32 = 88.0;
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const P0: f32 = 1.987_569_1e-4;
const P1: f32 = 1.398_199_9e-3;
const P2: f32 = 8.333_452e-3;
const P3: f32 = 4.166_579_6e-2;
const P4: f32 = 1.666_666_5e-1;
const P5: f32 = 0.5;

/// Portable backend: an 8-lane array "vector" that LLVM maps onto whatever SIMD the baseline
/// target has (SSE2 on x86-64). Used when no runtime-detected feature is present and as a
/// second implementation in the tests.
#[derive(Clone, Copy)]
pub(super) struct Portable;

impl Simd for Portable {
    const LANES: usize = 8;
    type V = [f32; 8];

    #[inline(always)]
    fn zero(self) -> [f32; 8] {
        [0.0; 8]
    }
    #[inline(always)]
    fn splat(self, x: f32) -> [f32; 8] {
        [x; 8]
    }
    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> [f32; 8] {
        // SAFETY: the caller guarantees 8 readable floats; unaligned read.
        unsafe { p.cast::<[f32; 8]>().read_unaligned() }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: [f32; 8]) {
        // SAFETY: the caller guarantees 8 writable floats; unaligned write.
        unsafe { p.cast::<[f32; 8]>().write_unaligned(v) }
    }
    #[inline(always)]
    fn fma(self, a: [f32; 8], b: [f32; 8], c: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    fn add(self, a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    fn sub(self, a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] - b[i])
    }
    #[inline(always)]
    fn mul(self, a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] * b[i])
    }
    #[inline(always)]
    fn max(self, a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i].max(b[i]))
    }
    #[inline(always)]
    fn hmax(self, v: [f32; 8]) -> f32 {
        v.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    }
    #[inline(always)]
    fn hsum(self, v: [f32; 8]) -> f32 {
        v.iter().sum()
    }
    #[inline(always)]
    fn exp(self, x: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| if x[i] < EXP_LO { 0.0 } else { x[i].exp() })
    }
    #[inline(always)]
    fn prefetch(self, _p: *const f32) {}

    #[inline(always)]
    unsafe fn qk_tile(
        self,
        q: *const f32,
        nq: usize,
        d: usize,
        kp: &[*const f32],
        kstride: usize,
        pf: &[*const f32],
        s: *mut f32,
    ) {
        // SAFETY: forwarded contract.
        unsafe { qk_tile_impl::<Self, 4, 2>(self, q, nq, d, kp, kstride, pf, s) }
    }
    #[inline(always)]
    unsafe fn pv_tile(
        self,
        p: *const f32,
        nq: usize,
        vp: &[*const f32],
        pf: &[*const f32],
        d: usize,
        o: *mut f32,
    ) {
        // SAFETY: forwarded contract.
        unsafe { pv_tile_impl::<Self, 4, 1>(self, p, nq, vp, pf, d, o) }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// AVX-512F backend (16 lanes, 32 registers): QK blocks of 6 queries x 4 key vectors (24
    /// accumulators), PV blocks of 4 queries x 4 value vectors (16 accumulators).
    #[derive(Clone, Copy)]
    pub(in crate::attention) struct Avx512(());

    impl Avx512 {
        /// The token, if this CPU has AVX-512F.
        pub(in crate::attention) fn detect() -> Option<Self> {
            is_x86_feature_detected!("avx512f").then_some(Self(()))
        }
    }

    // SAFETY (for every `unsafe` block in this impl): an `Avx512` value exists only after
    // `is_x86_feature_detected!("avx512f")` returned true, so the intrinsics are supported.
    impl Simd for Avx512 {
        const LANES: usize = 16;
        type V = __m512;

        #[inline(always)]
        fn zero(self) -> __m512 {
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        fn splat(self, x: f32) -> __m512 {
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(self, p: *const f32) -> __m512 {
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32, v: __m512) {
            unsafe { _mm512_storeu_ps(p, v) }
        }
        #[inline(always)]
        fn fma(self, a: __m512, b: __m512, c: __m512) -> __m512 {
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn add(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        fn max(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_max_ps(a, b) }
        }
        #[inline(always)]
        fn hmax(self, v: __m512) -> f32 {
            unsafe { _mm512_reduce_max_ps(v) }
        }
        #[inline(always)]
        fn hsum(self, v: __m512) -> f32 {
            unsafe { _mm512_reduce_add_ps(v) }
        }
        #[inline(always)]
        fn exp(self, x: __m512) -> __m512 {
            unsafe {
                let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(EXP_LO));
                let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(EXP_LO)), _mm512_set1_ps(EXP_HI));
                let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    _mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
                );
                let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
                let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
                let mut p = _mm512_set1_ps(P0);
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P1));
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P2));
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P3));
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P4));
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P5));
                let r2 = _mm512_mul_ps(r, r);
                let y = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
                _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(y, n))
            }
        }

        #[inline(always)]
        fn prefetch(self, p: *const f32) {
            // A hint: never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
        }
        #[inline(always)]
        unsafe fn qk_tile(
            self,
            q: *const f32,
            nq: usize,
            d: usize,
            kp: &[*const f32],
            kstride: usize,
            pf: &[*const f32],
            s: *mut f32,
        ) {
            unsafe { qk_tile_impl::<Self, 6, 4>(self, q, nq, d, kp, kstride, pf, s) }
        }
        #[inline(always)]
        unsafe fn pv_tile(
            self,
            p: *const f32,
            nq: usize,
            vp: &[*const f32],
            pf: &[*const f32],
            d: usize,
            o: *mut f32,
        ) {
            unsafe { pv_tile_impl::<Self, 4, 4>(self, p, nq, vp, pf, d, o) }
        }
    }

    /// AVX2+FMA backend (8 lanes, 16 registers): QK blocks of 6 queries x 2 key vectors (12
    /// accumulators), PV blocks of 4 queries x 2 value vectors (8 accumulators).
    #[derive(Clone, Copy)]
    pub(in crate::attention) struct Avx2(());

    impl Avx2 {
        /// The token, if this CPU has AVX2 and FMA.
        pub(in crate::attention) fn detect() -> Option<Self> {
            (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")).then_some(Self(()))
        }
    }

    // SAFETY (for every `unsafe` block in this impl): an `Avx2` value exists only after AVX2 and
    // FMA were detected.
    impl Simd for Avx2 {
        const LANES: usize = 8;
        type V = __m256;

        #[inline(always)]
        fn zero(self) -> __m256 {
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        fn splat(self, x: f32) -> __m256 {
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(self, p: *const f32) -> __m256 {
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32, v: __m256) {
            unsafe { _mm256_storeu_ps(p, v) }
        }
        #[inline(always)]
        fn fma(self, a: __m256, b: __m256, c: __m256) -> __m256 {
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn add(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        fn max(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_max_ps(a, b) }
        }
        #[inline(always)]
        fn hmax(self, v: __m256) -> f32 {
            unsafe {
                let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
                let m = _mm_max_ss(m, _mm_shuffle_ps::<0b01>(m, m));
                _mm_cvtss_f32(m)
            }
        }
        #[inline(always)]
        fn hsum(self, v: __m256) -> f32 {
            unsafe {
                let m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let m = _mm_add_ps(m, _mm_movehl_ps(m, m));
                let m = _mm_add_ss(m, _mm_shuffle_ps::<0b01>(m, m));
                _mm_cvtss_f32(m)
            }
        }
        #[inline(always)]
        fn exp(self, x: __m256) -> __m256 {
            unsafe {
                let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(EXP_LO));
                let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(EXP_LO)), _mm256_set1_ps(EXP_HI));
                let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
                    x,
                    _mm256_set1_ps(LOG2E),
                ));
                let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
                let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
                let mut p = _mm256_set1_ps(P0);
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P1));
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P2));
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P3));
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P4));
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P5));
                let r2 = _mm256_mul_ps(r, r);
                let y = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
                // 2^n built in the exponent field; n is in [-126, 127] after the clamp.
                let e =
                    _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
                _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), keep)
            }
        }

        #[inline(always)]
        fn prefetch(self, p: *const f32) {
            // A hint: never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
        }
        #[inline(always)]
        unsafe fn qk_tile(
            self,
            q: *const f32,
            nq: usize,
            d: usize,
            kp: &[*const f32],
            kstride: usize,
            pf: &[*const f32],
            s: *mut f32,
        ) {
            unsafe { qk_tile_impl::<Self, 6, 2>(self, q, nq, d, kp, kstride, pf, s) }
        }
        #[inline(always)]
        unsafe fn pv_tile(
            self,
            p: *const f32,
            nq: usize,
            vp: &[*const f32],
            pf: &[*const f32],
            d: usize,
            o: *mut f32,
        ) {
            unsafe { pv_tile_impl::<Self, 4, 2>(self, p, nq, vp, pf, d, o) }
        }
    }
}

// Compile-time check that every backend's vector width divides the tile.
const _: () = {
    assert!(TILE.is_multiple_of(16) && TILE.is_multiple_of(8));
};
