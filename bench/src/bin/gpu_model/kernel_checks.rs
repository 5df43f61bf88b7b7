//! Parity of the kernels the model on the GPU adds (row gather, RMSNorm with the residual add,
//! rotary embedding, `silu·up`, the projection matmul with bias, the device adapter pool) with
//! plain CPU loops, for f32, f16 and bf16 storage.

use std::fmt::Write as _;

use anyhow::Result;
use kernels::attention::Rope;
use kernels::cuda::{self, DeviceBuf, DeviceFloat, Gpu, GpuSegments, HostSite, LoraScratch, SlotPool};
use kernels::lora::workload::SplitMix64;
use kernels::lora::{lora_delta_reference, LoraMatrices, LoraSiteWeights, Segment};

/// One site of a test adapter: A, B and the DoRA factor.
type SiteData = (Vec<f32>, Vec<f32>, Option<Vec<f32>>);

/// `(name, worst error in units of the tolerance)` of each case; ≤ 1 passes.
type Cases = Vec<(&'static str, f32)>;

pub fn check_kernels(gpu: &Gpu) -> Result<(String, bool)> {
    let results = [
        run_cases::<f32>(gpu, 1e-4)?,
        run_cases::<half::f16>(gpu, 4.0 * 2f32.powi(-10))?,
        run_cases::<half::bf16>(gpu, 4.0 * 2f32.powi(-7))?,
    ];
    let mut report = String::from(
        "## Model kernels on the GPU: parity with CPU loops (worst error / tolerance; ≤ 1 passes)\n\n\
         | kernel | f32 | f16 | bf16 |\n| --- | ---: | ---: | ---: |\n",
    );
    let mut ok = true;
    for (i, (name, _)) in results[0].iter().enumerate() {
        let cells: Vec<String> = results
            .iter()
            .map(|cases| {
                let e = cases[i].1;
                ok &= e <= 1.0;
                if e <= 1.0 {
                    format!("{e:.3}")
                } else {
                    format!("**{e:.3} FAIL**")
                }
            })
            .collect();
        writeln!(report, "| {name} | {} |", cells.join(" | "))?;
    }
    report.push('\n');
    Ok((report, ok))
}

/// Random values already rounded to `T`, so the GPU and the loops start from the same numbers.
fn values<T: DeviceFloat>(rng: &mut SplitMix64, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| T::from_f32(rng.uniform(-scale, scale)).to_f32()).collect()
}

fn up<T: DeviceFloat>(gpu: &Gpu, v: &[f32]) -> Result<DeviceBuf<T>> {
    Ok(gpu.upload(&v.iter().map(|&x| T::from_f32(x)).collect::<Vec<T>>())?)
}

fn down<T: DeviceFloat>(gpu: &Gpu, buf: &DeviceBuf<T>) -> Result<Vec<f32>> {
    Ok(gpu.download(buf)?.into_iter().map(T::to_f32).collect())
}

/// Largest |got − want| over `tolerance · max(1, max |want|)`; a NaN or a length mismatch is
/// infinitely wrong.
fn error(got: &[f32], want: &[f32], tolerance: f32) -> f32 {
    if got.len() != want.len() {
        return f32::INFINITY;
    }
    let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let worst = got.iter().zip(want).fold(0.0f32, |m, (g, w)| {
        let d = (g - w).abs();
        if d.is_nan() {
            f32::INFINITY
        } else {
            m.max(d)
        }
    });
    worst / (tolerance * scale)
}

fn run_cases<T: DeviceFloat>(gpu: &Gpu, tol: f32) -> Result<Cases> {
    let mut rng = SplitMix64::new(21);
    let mut cases = Vec::new();

    // Row gather: 7 rows out of a 50 × 67 table, with repeats.
    let table = values::<T>(&mut rng, 50 * 67, 1.0);
    let idx = [3u32, 49, 0, 3, 17, 17, 8];
    let mut out = gpu.zeros::<T>(idx.len() * 67)?;
    cuda::gather_rows(gpu, &up::<T>(gpu, &table)?, 67, &idx, &mut out)?;
    let want: Vec<f32> = idx.iter().flat_map(|&i| table[i as usize * 67..][..67].to_vec()).collect();
    cases.push(("gather_rows (7 of 50 rows × 67)", error(&down(gpu, &out)?, &want, tol)));

    // RMSNorm, plain and with the residual add, width 576 (and an odd 1000) over 5 rows.
    for (name, width, with_delta) in
        [("rms_norm (5 × 576)", 576, false), ("residual + rms_norm (5 × 1000)", 1000, true)]
    {
        let rows = 5;
        let x = values::<T>(&mut rng, rows * width, 2.0);
        let delta = values::<T>(&mut rng, rows * width, 2.0);
        let weight: Vec<f32> = (0..width).map(|_| rng.uniform(0.5, 1.5)).collect();
        let eps = 1e-5;
        let mut x_dev = up::<T>(gpu, &x)?;
        let delta_dev = up::<T>(gpu, &delta)?;
        let mut out = gpu.zeros::<T>(rows * width)?;
        let weight_dev = gpu.upload(&weight)?;
        cuda::rms_norm(gpu, &mut x_dev, with_delta.then_some(&delta_dev), &weight_dev, eps, &mut out)?;
        let mut residual = x.clone();
        if with_delta {
            for (r, d) in residual.iter_mut().zip(&delta) {
                *r = T::from_f32(*r + d).to_f32();
            }
        }
        let mut want = vec![0f32; rows * width];
        for (row, out_row) in residual.chunks(width).zip(want.chunks_mut(width)) {
            let mean = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / width as f64;
            let inv = 1.0 / (mean + f64::from(eps)).sqrt();
            for ((o, &v), &w) in out_row.iter_mut().zip(row).zip(&weight) {
                *o = (f64::from(v) * inv * f64::from(w)) as f32;
            }
        }
        let mut e = error(&down(gpu, &out)?, &want, tol);
        // The residual stream itself must hold x + delta.
        e = e.max(error(&down(gpu, &x_dev)?, &residual, tol));
        cases.push((name, e));
    }

    // Rotary embedding: 6 rows, 5 heads of 64, positions up to 300.
    let (heads, dim) = (5, 64);
    let positions = [0usize, 1, 7, 63, 250, 299];
    let rope = Rope::new(dim, 10000.0, 16);
    let gpu_rope = cuda::GpuRope::new(gpu, &rope, 300)?;
    let x = values::<T>(&mut rng, positions.len() * heads * dim, 1.0);
    let mut x_dev = up::<T>(gpu, &x)?;
    cuda::rope(gpu, &mut x_dev, heads, &gpu_rope, &gpu_rope.positions(gpu, &positions)?)?;
    let mut want = x.clone();
    rope.apply(&mut want, heads, &positions)?;
    cases.push(("rope (6 rows × 5 heads × 64)", error(&down(gpu, &x_dev)?, &want, tol)));

    // silu(gate) · up over an odd length.
    let n = 3 * 1537;
    let gate = values::<T>(&mut rng, n, 4.0);
    let upv = values::<T>(&mut rng, n, 2.0);
    let mut gate_dev = up::<T>(gpu, &gate)?;
    cuda::silu_mul(gpu, &mut gate_dev, &up::<T>(gpu, &upv)?)?;
    let want: Vec<f32> = gate.iter().zip(&upv).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect();
    cases.push(("silu_mul (3 × 1537)", error(&down(gpu, &gate_dev)?, &want, tol)));

    // The projection matmul, with and without a bias, at odd shapes.
    for (name, rows, out_f, in_f, bias) in
        [("linear (9 × 200 → 77)", 9, 77, 200, false), ("linear + bias (33 × 576 → 192)", 33, 192, 576, true)]
    {
        let x = values::<T>(&mut rng, rows * in_f, 1.0);
        let w = values::<T>(&mut rng, out_f * in_f, 1.0 / (in_f as f32).sqrt());
        let b = values::<T>(&mut rng, out_f, 1.0);
        let mut y = gpu.zeros::<T>(rows * out_f)?;
        let b_dev = up::<T>(gpu, &b)?;
        cuda::linear(
            gpu,
            &up::<T>(gpu, &x)?,
            &up::<T>(gpu, &w)?,
            (out_f, in_f),
            bias.then_some(&b_dev),
            &mut y,
        )?;
        let mut want = vec![0f32; rows * out_f];
        for r in 0..rows {
            for o in 0..out_f {
                let dot: f64 =
                    (0..in_f).map(|k| f64::from(x[r * in_f + k]) * f64::from(w[o * in_f + k])).sum::<f64>();
                // The gemm rounds to T before the bias is added.
                let v = T::from_f32(dot as f32).to_f32();
                want[r * out_f + o] = if bias { v + b[o] } else { dot as f32 };
            }
        }
        cases.push((name, error(&down(gpu, &y)?, &want, tol)));
    }

    cases.push((
        "SlotPool: 3 adapters, ranks 4/16/8, one DoRA, 2 sites",
        slot_pool_case::<T>(gpu, &mut rng, tol)?,
    ));
    Ok(cases)
}

/// A pool of 5 slots over one group of two sites (in 300, out 129 and 64): three adapters in
/// slots 4, 0 and 2 (ranks 4, 16 and 8; the third with DoRA on site 0 and absent from site 1),
/// rows 0-2 base, then a segment per adapter, loaded through the upload stream; then slot 0 is
/// reloaded (and waited for) with another adapter and the pool must serve the new weights.
fn slot_pool_case<T: DeviceFloat>(gpu: &Gpu, rng: &mut SplitMix64, tol: f32) -> Result<f32> {
    let (inp, outs) = (300usize, [129usize, 64]);
    let rows = 14;
    let ranks = [4usize, 16, 8];
    let slots = [4usize, 0, 2];
    let seg_rows = [3..6, 6..11, 11..14];
    let make = |rng: &mut SplitMix64, rank: usize, dora: bool| -> Vec<SiteData> {
        outs.iter()
            .map(|&out| {
                let a = values::<T>(rng, rank * inp, 0.2);
                let b = values::<T>(rng, out * rank, 0.2);
                let g = dora.then(|| (0..out).map(|_| rng.uniform(0.5, 1.5)).collect());
                (a, b, g)
            })
            .collect()
    };
    let adapters: Vec<Vec<SiteData>> = ranks.iter().enumerate().map(|(k, &r)| make(rng, r, k == 2)).collect();
    let scales = [0.5f32, 2.0, 1.25];
    fn host_sites<'a>(
        k: usize,
        data: &'a [SiteData],
        rank: usize,
        scale: f32,
    ) -> Vec<Vec<Option<HostSite<'a>>>> {
        // The third adapter leaves site 1 alone.
        vec![data
            .iter()
            .enumerate()
            .map(|(s, (a, b, g))| {
                (k != 2 || s == 0).then(|| HostSite { a, b, dora: g.as_deref(), rank, scale })
            })
            .collect()]
    }
    let mut pool = SlotPool::<T>::new(gpu, 5, &[(inp, outs.to_vec())])?;
    // All three copies are queued at once on the upload stream, then polled until done.
    for (k, data) in adapters.iter().enumerate() {
        pool.begin_load(gpu, slots[k], &host_sites(k, data, ranks[k], scales[k]))?;
    }
    let started = std::time::Instant::now();
    while !slots.iter().map(|&s| pool.poll(s)).collect::<Result<Vec<bool>, _>>()?.iter().all(|&ready| ready) {
        if started.elapsed() > std::time::Duration::from_secs(10) {
            anyhow::bail!("the pool's uploads were not done after 10 s");
        }
        std::thread::yield_now();
    }
    let x = values::<T>(rng, rows * inp, 1.0);
    let ys: Vec<Vec<f32>> = outs.iter().map(|&o| values::<T>(rng, rows * o, 1.0)).collect();
    let reference =
        |adapters: &[Vec<SiteData>], present: &dyn Fn(usize, usize) -> bool| -> Result<Vec<Vec<f32>>> {
            let mut want = ys.clone();
            for (s, (y, &out)) in want.iter_mut().zip(&outs).enumerate() {
                let segments: Vec<Segment> = (0..adapters.len())
                    .filter(|&k| present(k, s))
                    .map(|k| {
                        let (a, b, g) = &adapters[k][s];
                        Segment {
                            rows: seg_rows[k].clone(),
                            weights: LoraSiteWeights {
                                matrices: LoraMatrices::F32 { a, b },
                                rank: ranks[k],
                                scale: scales[k],
                                dora_factor: g.as_deref(),
                            },
                        }
                    })
                    .collect();
                lora_delta_reference(&x, inp, y, out, &segments)?;
            }
            Ok(want)
        };
    let run = |pool: &SlotPool<T>| -> Result<Vec<Vec<f32>>> {
        let x_dev = up::<T>(gpu, &x)?;
        let mut y_devs = ys.iter().map(|y| up::<T>(gpu, y)).collect::<Result<Vec<_>>>()?;
        let packed: Vec<(std::ops::Range<usize>, u32)> =
            seg_rows.iter().zip(slots).map(|(r, s)| (r.clone(), s as u32)).collect();
        let segments = GpuSegments::new(gpu, rows, pool.n_slots(), &packed)?;
        let mut refs: Vec<&mut DeviceBuf<T>> = y_devs.iter_mut().collect();
        pool.delta(gpu, 0, &x_dev, &mut refs, &segments, &mut LoraScratch::new())?;
        y_devs.iter().map(|y| down(gpu, y)).collect()
    };
    let present = |k: usize, s: usize| k != 2 || s == 0;
    let worst = |got: &[Vec<f32>], want: &[Vec<f32>]| {
        got.iter().zip(want).map(|(g, w)| error(g, w, tol)).fold(0.0, f32::max)
    };

    pool.sync(gpu)?;
    let first = worst(&run(&pool)?, &reference(&adapters, &present)?);
    // A reload of slot 0 must replace the second adapter's weights everywhere.
    let mut replaced = adapters.clone();
    replaced[1] = make(rng, ranks[1], false);
    pool.load(gpu, slots[1], &host_sites(1, &replaced[1], ranks[1], scales[1]))?;
    // Until the next sync the pool must refuse to run: everything else about this call is valid.
    let refused_stale = run(&pool).is_err();
    pool.sync(gpu)?;
    let second = worst(&run(&pool)?, &reference(&replaced, &present)?);
    Ok(if refused_stale { first.max(second) } else { f32::INFINITY })
}
