//! SIMD backends of the LoRA kernels: one small trait, three implementations (AVX-512F 16 lanes,
//! AVX2+FMA 8 lanes, portable 8-lane arrays).
//!
//! The generic kernels in `kernel.rs` are written once against [`Simd`] and marked
//! `#[inline(always)]`; they are instantiated inside `#[target_feature]` entry points, where these
//! methods inline into straight vector code. A backend value is a token: the x86 ones can only be
//! made after their CPU features were detected, which is what makes the `unsafe` intrinsics
//! behind the safe-looking methods sound.
//!
//! Every method is a fixed sequence of lane-wise IEEE operations (or, for `hsum`, a fixed
//! reduction tree), so a given backend computes the same bits for the same inputs wherever the
//! vector sits in a batch. Batch invariance of the LoRA op rests on that.

/// Vector operations the LoRA kernels need.
pub(super) trait Simd: Copy {
    /// f32 lanes per vector.
    const LANES: usize;
    type V: Copy;

    fn zero(self) -> Self::V;
    fn splat(self, x: f32) -> Self::V;
    /// # Safety
    /// `p` must be valid for reading `LANES` floats.
    unsafe fn load(self, p: *const f32) -> Self::V;
    /// Lanes `0..n` from `p`, the others 0; reads only `n` floats.
    ///
    /// # Safety
    /// `n <= LANES` and `p` valid for reading `n` floats.
    unsafe fn load_partial(self, p: *const f32, n: usize) -> Self::V;
    /// # Safety
    /// `p` must be valid for writing `LANES` floats.
    unsafe fn store(self, p: *mut f32, v: Self::V);
    /// Writes lanes `0..n` only.
    ///
    /// # Safety
    /// `n <= LANES` and `p` valid for writing `n` floats.
    unsafe fn store_partial(self, p: *mut f32, v: Self::V, n: usize);
    /// `a * b + c` (fused on the x86 backends).
    fn fma(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    /// Sum of the lanes, by a fixed tree.
    fn hsum(self, v: Self::V) -> f32;
    /// Hint that the cache line holding `p` will be read soon (into L2 on x86, so the L1 miss
    /// buffers stay free for demand loads); never faults, whatever `p` is.
    fn prefetch(self, p: *const f32);
    /// `dst[c * dst_stride + r] = src[r * src_stride + c]` for `r < LANES`, `c < cols`, with the
    /// source rows `r >= rows` read as zeros: one `LANES x cols` block transposed.
    ///
    /// # Safety
    /// `rows, cols <= LANES`; `src` valid for reading `cols` floats at each of the `rows` row
    /// starts; `dst` valid for writing `LANES` floats at each of the `cols` row starts.
    unsafe fn transpose(
        self,
        src: *const f32,
        src_stride: usize,
        rows: usize,
        cols: usize,
        dst: *mut f32,
        dst_stride: usize,
    );
}

/// Portable backend: 8-lane arrays that LLVM vectorises with whatever the baseline target has.
/// `fma` is a separate multiply and add (a software fused multiply-add would be a libm call).
#[derive(Clone, Copy)]
pub(super) struct Portable;

const PL: usize = 8;

impl Simd for Portable {
    const LANES: usize = PL;
    type V = [f32; PL];

    #[inline(always)]
    fn zero(self) -> [f32; PL] {
        [0.0; PL]
    }
    #[inline(always)]
    fn splat(self, x: f32) -> [f32; PL] {
        [x; PL]
    }
    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> [f32; PL] {
        // SAFETY: the caller guarantees PL readable floats.
        unsafe { p.cast::<[f32; PL]>().read_unaligned() }
    }
    #[inline(always)]
    unsafe fn load_partial(self, p: *const f32, n: usize) -> [f32; PL] {
        let mut v = [0.0; PL];
        for (i, x) in v.iter_mut().enumerate().take(n) {
            // SAFETY: i < n and the caller guarantees n readable floats.
            *x = unsafe { *p.add(i) };
        }
        v
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: [f32; PL]) {
        // SAFETY: the caller guarantees PL writable floats.
        unsafe { p.cast::<[f32; PL]>().write_unaligned(v) }
    }
    #[inline(always)]
    unsafe fn store_partial(self, p: *mut f32, v: [f32; PL], n: usize) {
        for (i, x) in v.iter().enumerate().take(n) {
            // SAFETY: i < n and the caller guarantees n writable floats.
            unsafe { *p.add(i) = *x };
        }
    }
    #[inline(always)]
    fn fma(self, a: [f32; PL], b: [f32; PL], c: [f32; PL]) -> [f32; PL] {
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    fn mul(self, a: [f32; PL], b: [f32; PL]) -> [f32; PL] {
        std::array::from_fn(|i| a[i] * b[i])
    }
    #[inline(always)]
    fn prefetch(self, _p: *const f32) {}
    #[inline(always)]
    fn hsum(self, v: [f32; PL]) -> f32 {
        let h: [f32; 4] = std::array::from_fn(|i| v[i] + v[i + 4]);
        let q = [h[0] + h[2], h[1] + h[3]];
        q[0] + q[1]
    }
    #[inline(always)]
    unsafe fn transpose(
        self,
        src: *const f32,
        src_stride: usize,
        rows: usize,
        cols: usize,
        dst: *mut f32,
        dst_stride: usize,
    ) {
        for c in 0..cols {
            for r in 0..PL {
                // SAFETY: r < rows and c < cols are inside the source block, and the
                // destination has PL floats at each of the cols row starts (caller contract).
                unsafe {
                    let v = if r < rows { *src.add(r * src_stride + c) } else { 0.0 };
                    *dst.add(c * dst_stride + r) = v;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Simd;
    use std::arch::x86_64::*;

    /// AVX-512F backend (16 lanes). Make one only where AVX-512F is present (see `new`).
    #[derive(Clone, Copy)]
    pub(in crate::lora) struct Avx512(());

    impl Avx512 {
        /// # Safety
        /// The CPU must support AVX-512F (the token vouches for it to every method below).
        #[inline(always)]
        pub(in crate::lora) unsafe fn new() -> Self {
            Self(())
        }
    }

    /// Lane mask of the first `n <= 16` lanes.
    #[inline(always)]
    fn mask16(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    // SAFETY (every `unsafe` block in this impl): an `Avx512` token exists only on a CPU with
    // AVX-512F (see `Avx512::new`), and pointer validity is the caller's contract.
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
        unsafe fn load_partial(self, p: *const f32, n: usize) -> __m512 {
            // Masked-off lanes are not accessed (no fault past the end of a slice).
            unsafe { _mm512_maskz_loadu_ps(mask16(n), p) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32, v: __m512) {
            unsafe { _mm512_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn store_partial(self, p: *mut f32, v: __m512, n: usize) {
            unsafe { _mm512_mask_storeu_ps(p, mask16(n), v) }
        }
        #[inline(always)]
        fn fma(self, a: __m512, b: __m512, c: __m512) -> __m512 {
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn mul(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        fn prefetch(self, p: *const f32) {
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
        }
        #[inline(always)]
        fn hsum(self, v: __m512) -> f32 {
            unsafe {
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
                let s = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
                let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
                _mm_cvtss_f32(s)
            }
        }
        #[inline(always)]
        unsafe fn transpose(
            self,
            src: *const f32,
            src_stride: usize,
            rows: usize,
            cols: usize,
            dst: *mut f32,
            dst_stride: usize,
        ) {
            unsafe {
                let mut r = [_mm512_setzero_ps(); 16];
                if rows == 16 && cols == 16 {
                    for (i, v) in r.iter_mut().enumerate() {
                        *v = _mm512_loadu_ps(src.add(i * src_stride));
                    }
                } else {
                    // Branch-free loads keep the tile in registers: rows past `rows` use an empty
                    // mask (zeros, no memory access, so their address may be anything).
                    let m = mask16(cols);
                    for (i, v) in r.iter_mut().enumerate() {
                        let mi = if i < rows { m } else { 0 };
                        *v = _mm512_maskz_loadu_ps(mi, src.wrapping_add(i * src_stride));
                    }
                }
                // Stage 1: pairs of rows interleaved inside each 128-bit lane.
                let mut t = [_mm512_setzero_ps(); 16];
                for i in 0..8 {
                    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
                    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
                }
                // Stage 2: u[4g + c], 128-bit lane k = rows 4g..4g+4 of column 4k + c.
                let mut u = [_mm512_setzero_ps(); 16];
                for g in 0..4 {
                    let b = 4 * g;
                    u[b] = _mm512_shuffle_ps::<0x44>(t[b], t[b + 2]);
                    u[b + 1] = _mm512_shuffle_ps::<0xee>(t[b], t[b + 2]);
                    u[b + 2] = _mm512_shuffle_ps::<0x44>(t[b + 1], t[b + 3]);
                    u[b + 3] = _mm512_shuffle_ps::<0xee>(t[b + 1], t[b + 3]);
                }
                // Stage 3: v[c] / v[c+4] (rows 0..8) and v[8+c] / v[12+c] (rows 8..16) hold
                // columns c and c+8 / c+4 and c+12 as 4-row quarters.
                let mut v = [_mm512_setzero_ps(); 16];
                for h in 0..2 {
                    for c in 0..4 {
                        let (a, b) = (u[8 * h + c], u[8 * h + 4 + c]);
                        v[8 * h + c] = _mm512_shuffle_f32x4::<0x88>(a, b);
                        v[8 * h + 4 + c] = _mm512_shuffle_f32x4::<0xdd>(a, b);
                    }
                }
                // Stage 4: whole columns; column i < 8 from v[i], v[i+8], column i+8 likewise.
                for i in 0..8 {
                    let lo = _mm512_shuffle_f32x4::<0x88>(v[i], v[i + 8]);
                    let hi = _mm512_shuffle_f32x4::<0xdd>(v[i], v[i + 8]);
                    if i < cols {
                        _mm512_storeu_ps(dst.add(i * dst_stride), lo);
                    }
                    if i + 8 < cols {
                        _mm512_storeu_ps(dst.add((i + 8) * dst_stride), hi);
                    }
                }
            }
        }
    }

    /// AVX2+FMA backend (8 lanes). Make one only where AVX2 and FMA are present (see `new`).
    #[derive(Clone, Copy)]
    pub(in crate::lora) struct Avx2(());

    impl Avx2 {
        /// # Safety
        /// The CPU must support AVX2 and FMA.
        #[inline(always)]
        pub(in crate::lora) unsafe fn new() -> Self {
            Self(())
        }
    }

    /// `maskload`/`maskstore` mask of the first `n <= 8` lanes.
    #[inline(always)]
    unsafe fn mask8(n: usize) -> __m256i {
        unsafe { _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)) }
    }

    // SAFETY (every `unsafe` block in this impl): an `Avx2` token exists only on a CPU with AVX2
    // and FMA, and pointer validity is the caller's contract.
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
        unsafe fn load_partial(self, p: *const f32, n: usize) -> __m256 {
            // Masked-off lanes are not accessed (no fault past the end of a slice).
            unsafe { _mm256_maskload_ps(p, mask8(n)) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32, v: __m256) {
            unsafe { _mm256_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn store_partial(self, p: *mut f32, v: __m256, n: usize) {
            unsafe { _mm256_maskstore_ps(p, mask8(n), v) }
        }
        #[inline(always)]
        fn fma(self, a: __m256, b: __m256, c: __m256) -> __m256 {
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn mul(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        fn prefetch(self, p: *const f32) {
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
        }
        #[inline(always)]
        fn hsum(self, v: __m256) -> f32 {
            unsafe {
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
                _mm_cvtss_f32(s)
            }
        }
        #[inline(always)]
        unsafe fn transpose(
            self,
            src: *const f32,
            src_stride: usize,
            rows: usize,
            cols: usize,
            dst: *mut f32,
            dst_stride: usize,
        ) {
            unsafe {
                let mut r = [_mm256_setzero_ps(); 8];
                if rows == 8 && cols == 8 {
                    for (i, v) in r.iter_mut().enumerate() {
                        *v = _mm256_loadu_ps(src.add(i * src_stride));
                    }
                } else {
                    // Branch-free as in the AVX-512 version (an all-zero mask reads nothing).
                    let m = mask8(cols);
                    for (i, v) in r.iter_mut().enumerate() {
                        let mi = if i < rows { m } else { _mm256_setzero_si256() };
                        *v = _mm256_maskload_ps(src.wrapping_add(i * src_stride), mi);
                    }
                }
                let mut t = [_mm256_setzero_ps(); 8];
                for i in 0..4 {
                    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
                    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
                }
                // u[4g + c], 128-bit lane k = rows 4g..4g+4 of column 4k + c.
                let mut u = [_mm256_setzero_ps(); 8];
                for g in 0..2 {
                    let b = 4 * g;
                    u[b] = _mm256_shuffle_ps::<0x44>(t[b], t[b + 2]);
                    u[b + 1] = _mm256_shuffle_ps::<0xee>(t[b], t[b + 2]);
                    u[b + 2] = _mm256_shuffle_ps::<0x44>(t[b + 1], t[b + 3]);
                    u[b + 3] = _mm256_shuffle_ps::<0xee>(t[b + 1], t[b + 3]);
                }
                for c in 0..4 {
                    let lo = _mm256_permute2f128_ps::<0x20>(u[c], u[4 + c]);
                    let hi = _mm256_permute2f128_ps::<0x31>(u[c], u[4 + c]);
                    // Plain stores: `vmaskmovps` stores are microcoded and slow on AMD.
                    if c < cols {
                        _mm256_storeu_ps(dst.add(c * dst_stride), lo);
                    }
                    if c + 4 < cols {
                        _mm256_storeu_ps(dst.add((c + 4) * dst_stride), hi);
                    }
                }
            }
        }
    }
}
