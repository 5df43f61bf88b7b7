//! Random GGML-quantized weight matrices and activations for the kernel benchmarks.

use kernels::quant::{QuantFormat, QuantMatrix};

/// Deterministic pseudo-random bytes (xorshift), so no rand dependency is needed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

fn f16_bytes(v: f32) -> [u8; 2] {
    half_bits(v).to_le_bytes()
}

/// f32 → IEEE half bits for normal values in the f16 range (all this benchmark needs).
fn half_bits(v: f32) -> u16 {
    let b = v.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
    let man = ((b >> 13) & 0x3ff) as u16;
    sign | ((exp.clamp(1, 30) as u16) << 10) | man
}

pub fn random_matrix(format: QuantFormat, out: usize, inp: usize, rng: &mut Rng) -> QuantMatrix {
    let blocks = out * inp / 32;
    let mut bytes = Vec::with_capacity(blocks * format.ggml_block_bytes());
    for _ in 0..blocks {
        let d = 1e-3 + 1.9e-2 * rng.unit();
        bytes.extend_from_slice(&f16_bytes(d));
        let payload = match format {
            QuantFormat::Q4_1 => {
                bytes.extend_from_slice(&f16_bytes(-8.0 * d));
                16
            }
            QuantFormat::Q8_0 => 32,
        };
        for _ in 0..payload {
            bytes.push(rng.next_u64() as u8);
        }
    }
    match QuantMatrix::from_ggml_bytes(format, out, inp, &bytes) {
        Ok(m) => m,
        Err(e) => panic!("benchmark matrix: {e}"),
    }
}

pub fn random_x(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| rng.unit() * 2.0 - 1.0).collect()
}
