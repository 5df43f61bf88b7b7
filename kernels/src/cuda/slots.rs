//! The device tier of the adapter cache as the kernels see it: a fixed number of slots, each
//! holding one adapter's `A`, `B` (and DoRA factors) for every site in one device buffer, and per
//! site group (one layer's q/k/v, say) the `[sites][n_slots]` slot table that [`super::lora_delta`]'s
//! kernels read, kept in step with the slots.
//!
//! An adapter comes in without stalling the steps: [`SlotPool::begin_load`] converts it into
//! pinned host memory and queues the copy on the upload stream; the slot joins the tables only
//! once [`SlotPool::poll`] finds the copy done, so a step never reads half an adapter and never
//! waits for one. Which adapter sits in which slot, and when one may be replaced, is the
//! caller's business: a slot must not be replaced while a row of a queued step uses it. The
//! memory a replaced slot held is freed on the upload stream after the compute stream's queued
//! work ([`Gpu::uploads_after_compute`]), so a step already queued still reads valid memory.

use super::{delta_with_table, DeviceBuf, DeviceFloat, Gpu, GpuSegments, LoraScratch, SlotSite, TableView};
use super::{PinnedBuf, UploadMark, MAX_RANK, MAX_SLOTS};
use crate::KernelError;

/// One site of an adapter as the host holds it (f32; stored as `T` on the device).
#[derive(Clone, Copy, Debug)]
pub struct HostSite<'a> {
    /// `[rank, in_features]`.
    pub a: &'a [f32],
    /// `[out_features, rank]`.
    pub b: &'a [f32],
    /// DoRA's per-output factor, `[out_features]`.
    pub dora: Option<&'a [f32]>,
    pub rank: usize,
    pub scale: f32,
}

/// The shapes of one site group and its slot table, host copy first.
struct Group {
    in_features: usize,
    out_features: Vec<usize>,
    /// `[sites][n_slots]`, what `table` holds once synced.
    records: Vec<SlotSite>,
    table: DeviceBuf<SlotSite>,
    /// Changed since the last [`SlotPool::sync`].
    dirty: bool,
    r_max: usize,
    /// Some slot has a site of this group: otherwise a call has nothing to add and is skipped.
    populated: bool,
}

/// One slot's device memory.
struct SlotMemory<T> {
    /// Every present site's `A` then `B`, group by group, in `T`.
    weights: DeviceBuf<T>,
    /// Every DoRA site's factor, in f32.
    dora_factors: Option<DeviceBuf<f32>>,
}

impl<T> SlotMemory<T> {
    fn bytes(&self) -> usize {
        self.weights.len() * std::mem::size_of::<T>()
            + self.dora_factors.as_ref().map_or(0, |d| d.len() * std::mem::size_of::<f32>())
    }
}

/// A load whose copy may still be running.
struct PendingLoad<T> {
    memory: SlotMemory<T>,
    /// `(group, site, record)` of each present site, for the tables once the copy is done.
    records: Vec<(usize, usize, SlotSite)>,
    done: UploadMark,
}

enum SlotState<T> {
    Empty,
    /// Being copied in; the tables still show the slot empty.
    Loading(PendingLoad<T>),
    /// In the tables from the next [`SlotPool::sync`] on.
    Ready(SlotMemory<T>),
}

/// Pinned host memory that loads are converted into, reused once the copy reading it is done.
struct Staging<T> {
    weights: PinnedBuf<T>,
    dora: PinnedBuf<f32>,
    /// The copy that reads this memory.
    busy: Option<UploadMark>,
}

impl<T> Staging<T> {
    fn is_free(&self) -> Result<bool, KernelError> {
        self.busy.as_ref().map_or(Ok(true), UploadMark::is_done)
    }
}

/// `n_slots` adapter slots over a fixed list of site groups.
pub struct SlotPool<T> {
    n_slots: usize,
    groups: Vec<Group>,
    slots: Vec<SlotState<T>>,
    staging: Vec<Staging<T>>,
}

impl<T: DeviceFloat> SlotPool<T> {
    /// An empty pool: `groups[g] = (in_features, out_features of each site)`.
    pub fn new(gpu: &Gpu, n_slots: usize, groups: &[(usize, Vec<usize>)]) -> Result<Self, KernelError> {
        if n_slots == 0 || n_slots > MAX_SLOTS {
            return Err(KernelError::Shape(format!("a pool needs 1 to {MAX_SLOTS} slots, not {n_slots}")));
        }
        let groups = groups
            .iter()
            .map(|(in_features, out_features)| {
                if out_features.is_empty() {
                    return Err(KernelError::Shape("a site group needs at least one site".into()));
                }
                let records = vec![SlotSite::default(); out_features.len() * n_slots];
                Ok(Group {
                    in_features: *in_features,
                    out_features: out_features.clone(),
                    table: gpu.upload(&records)?,
                    records,
                    dirty: false,
                    r_max: 1,
                    populated: false,
                })
            })
            .collect::<Result<Vec<_>, KernelError>>()?;
        let slots = (0..n_slots).map(|_| SlotState::Empty).collect();
        Ok(SlotPool { n_slots, groups, slots, staging: Vec::new() })
    }

    pub fn n_slots(&self) -> usize {
        self.n_slots
    }

    /// Device bytes held by the slots' weights, loading ones included.
    pub fn weight_bytes(&self) -> usize {
        self.slots
            .iter()
            .map(|state| match state {
                SlotState::Empty => 0,
                SlotState::Loading(load) => load.memory.bytes(),
                SlotState::Ready(memory) => memory.bytes(),
            })
            .sum()
    }

    /// Device bytes an adapter of these sites takes in a slot.
    pub fn bytes_for(sites: &[Vec<Option<HostSite<'_>>>]) -> usize {
        let (weights, dora) = Self::lengths(sites);
        weights * std::mem::size_of::<T>() + dora * std::mem::size_of::<f32>()
    }

    /// Values of `T` and of f32 (DoRA factors) the sites take.
    fn lengths(sites: &[Vec<Option<HostSite<'_>>>]) -> (usize, usize) {
        sites.iter().flatten().flatten().fold((0, 0), |(weights, dora), site| {
            (weights + site.a.len() + site.b.len(), dora + site.dora.map_or(0, <[f32]>::len))
        })
    }

    /// Puts one adapter in `slot` and waits for it: [`SlotPool::begin_load`], then the wait.
    pub fn load(
        &mut self,
        gpu: &Gpu,
        slot: usize,
        sites: &[Vec<Option<HostSite<'_>>>],
    ) -> Result<(), KernelError> {
        self.begin_load(gpu, slot, sites)?;
        self.finish_load(slot)
    }

    /// Starts putting one adapter in `slot`, replacing what was there: `sites[g][s]` is site `s`
    /// of group `g` (`None`: the adapter leaves that projection alone). The values are converted
    /// into pinned memory here; the copy runs on the upload stream while the host goes on, and
    /// the slot joins the tables once [`SlotPool::poll`] finds it done. Everything is checked
    /// first: a shape `Err` names the group and site and leaves the slot as it was; a device
    /// `Err` after that leaves it empty.
    pub fn begin_load(
        &mut self,
        gpu: &Gpu,
        slot: usize,
        sites: &[Vec<Option<HostSite<'_>>>],
    ) -> Result<(), KernelError> {
        self.check_load(slot, sites)?;
        let (weight_len, dora_len) = Self::lengths(sites);
        let staging = self.free_staging(gpu, weight_len, dora_len)?;
        self.clear(gpu, slot)?;
        let stage = &mut self.staging[staging];
        let (weights, dora) = (stage.weights.as_mut_slice()?, stage.dora.as_mut_slice()?);
        let (mut weights_at, mut dora_at) = (0, 0);
        // (group, site, A offset, B offset, DoRA offset, rank, scale) of each present site.
        let mut placed = Vec::new();
        for (g, group_sites) in sites.iter().enumerate() {
            for (s, site) in group_sites.iter().enumerate() {
                let Some(site) = site else { continue };
                let mut put = |values: &[f32]| {
                    let at = weights_at;
                    for (dst, &v) in weights[at..at + values.len()].iter_mut().zip(values) {
                        *dst = T::from_f32(v);
                    }
                    weights_at += values.len();
                    at
                };
                let (a_at, b_at) = (put(site.a), put(site.b));
                let factor_at = site.dora.map(|factor| {
                    let at = dora_at;
                    dora[at..at + factor.len()].copy_from_slice(factor);
                    dora_at += factor.len();
                    at
                });
                placed.push((g, s, a_at, b_at, factor_at, site.rank, site.scale));
            }
        }
        let weight_buf = gpu.upload_staged(&stage.weights, weight_len)?;
        let dora_buf = if dora_len == 0 { None } else { Some(gpu.upload_staged(&stage.dora, dora_len)?) };
        let done = gpu.mark_uploads()?;
        stage.busy = Some(gpu.mark_uploads()?);
        let base = gpu.address(&weight_buf);
        let dora_base = dora_buf.as_ref().map_or(0, |d| gpu.address(d));
        let elem = std::mem::size_of::<T>() as u64;
        let records = placed
            .into_iter()
            .map(|(g, s, a_at, b_at, factor_at, rank, scale)| {
                let record = SlotSite {
                    a: base + a_at as u64 * elem,
                    b: base + b_at as u64 * elem,
                    dora: factor_at.map_or(0, |at| dora_base + at as u64 * 4),
                    rank: rank as u32,
                    scale,
                };
                (g, s, record)
            })
            .collect();
        let memory = SlotMemory { weights: weight_buf, dora_factors: dora_buf };
        self.slots[slot] = SlotState::Loading(PendingLoad { memory, records, done });
        Ok(())
    }

    /// Whether `slot` holds an adapter whose copy is done, without waiting: a finished load
    /// joins the tables here (from the next [`SlotPool::sync`] on). `false` for an empty slot.
    pub fn poll(&mut self, slot: usize) -> Result<bool, KernelError> {
        match self.slots.get(slot) {
            Some(SlotState::Ready(_)) => return Ok(true),
            Some(SlotState::Loading(load)) if load.done.is_done()? => {}
            _ => return Ok(false),
        }
        let SlotState::Loading(load) = std::mem::replace(&mut self.slots[slot], SlotState::Empty) else {
            return Ok(false);
        };
        for (g, s, record) in load.records {
            let group = &mut self.groups[g];
            group.records[s * self.n_slots + slot] = record;
            group.dirty = true;
        }
        self.slots[slot] = SlotState::Ready(load.memory);
        Ok(true)
    }

    /// Waits for `slot`'s load, if one is running, and lets it join the tables.
    pub fn finish_load(&mut self, slot: usize) -> Result<(), KernelError> {
        if let Some(SlotState::Loading(load)) = self.slots.get(slot) {
            load.done.wait()?;
        }
        self.poll(slot).map(drop)
    }

    /// A staging buffer no copy reads any more with room for the values; a new one if none has.
    fn free_staging(&mut self, gpu: &Gpu, weights: usize, dora: usize) -> Result<usize, KernelError> {
        let mut too_small = None;
        for (i, stage) in self.staging.iter().enumerate() {
            if !stage.is_free()? {
                continue;
            }
            if stage.weights.len() >= weights && stage.dora.len() >= dora {
                return Ok(i);
            }
            too_small.get_or_insert(i);
        }
        match too_small {
            Some(i) => {
                // Grown, never shrunk: adapters of one deployment tend to be alike.
                let old = &self.staging[i];
                let (weights, dora) = (weights.max(old.weights.len()), dora.max(old.dora.len()));
                self.staging[i] =
                    Staging { weights: gpu.pinned(weights)?, dora: gpu.pinned(dora)?, busy: None };
                Ok(i)
            }
            None => {
                self.staging.push(Staging {
                    weights: gpu.pinned(weights)?,
                    dora: gpu.pinned(dora)?,
                    busy: None,
                });
                Ok(self.staging.len() - 1)
            }
        }
    }

    fn check_load(&self, slot: usize, sites: &[Vec<Option<HostSite<'_>>>]) -> Result<(), KernelError> {
        if slot >= self.n_slots {
            return Err(KernelError::Shape(format!("slot {slot} of a pool of {}", self.n_slots)));
        }
        if sites.len() != self.groups.len() {
            return Err(KernelError::Shape(format!(
                "{} site groups for a pool of {}",
                sites.len(),
                self.groups.len()
            )));
        }
        for (g, (group_sites, group)) in sites.iter().zip(&self.groups).enumerate() {
            if group_sites.len() != group.out_features.len() {
                return Err(KernelError::Shape(format!(
                    "group {g}: {} sites, the pool has {}",
                    group_sites.len(),
                    group.out_features.len()
                )));
            }
            for (s, (site, &out)) in group_sites.iter().zip(&group.out_features).enumerate() {
                let Some(site) = site else { continue };
                let bad = |why: String| Err(KernelError::Shape(format!("group {g} site {s}: {why}")));
                if site.rank == 0 || site.rank > MAX_RANK {
                    return bad(format!("rank {} is outside the GPU kernels' 1..={MAX_RANK}", site.rank));
                }
                if site.a.len() != site.rank * group.in_features || site.b.len() != out * site.rank {
                    return bad(format!(
                        "A holds {} and B {} values; rank {} needs {} and {}",
                        site.a.len(),
                        site.b.len(),
                        site.rank,
                        site.rank * group.in_features,
                        out * site.rank
                    ));
                }
                if site.dora.is_some_and(|d| d.len() != out) {
                    return bad(format!("the DoRA factor must hold {out} values"));
                }
                if !site.scale.is_finite() {
                    return bad(format!("scale {} is not finite", site.scale));
                }
            }
        }
        Ok(())
    }

    /// Empties `slot`: its rows get no delta from the next [`SlotPool::sync`] on. Its memory is
    /// freed after the work already queued on the compute stream (and any copy into it).
    pub fn clear(&mut self, gpu: &Gpu, slot: usize) -> Result<(), KernelError> {
        let Some(state) = self.slots.get(slot) else { return Ok(()) };
        if matches!(state, SlotState::Empty) {
            return Ok(());
        }
        gpu.uploads_after_compute()?;
        for group in &mut self.groups {
            for s in 0..group.out_features.len() {
                group.records[s * self.n_slots + slot] = SlotSite::default();
            }
            group.dirty = true;
        }
        self.slots[slot] = SlotState::Empty;
        Ok(())
    }

    /// Writes the tables of the groups that changed since the last sync to the device.
    pub fn sync(&mut self, gpu: &Gpu) -> Result<(), KernelError> {
        for group in self.groups.iter_mut().filter(|g| g.dirty) {
            gpu.write(&mut group.table, &group.records)?;
            let r_max = group.records.iter().map(|r| r.rank as usize).max().unwrap_or(0);
            group.populated = r_max > 0;
            group.r_max = r_max.max(1);
            group.dirty = false;
        }
        Ok(())
    }

    /// [`super::lora_delta`] for group `group`'s sites, with the slots as they were at the last
    /// [`SlotPool::sync`] (`Err` if a load or clear came after it). A group no slot adapts
    /// queues nothing.
    pub fn delta(
        &self,
        gpu: &Gpu,
        group: usize,
        x: &DeviceBuf<T>,
        ys: &mut [&mut DeviceBuf<T>],
        segments: &GpuSegments,
        scratch: &mut LoraScratch,
    ) -> Result<(), KernelError> {
        let g = self
            .groups
            .get(group)
            .ok_or_else(|| KernelError::Shape(format!("group {group} of a pool of {}", self.groups.len())))?;
        if g.dirty {
            return Err(KernelError::Shape(format!("group {group}'s slots changed since the last sync")));
        }
        if !g.populated {
            return Ok(());
        }
        let view = TableView {
            records: &g.table,
            in_features: g.in_features,
            out_features: &g.out_features,
            n_slots: self.n_slots,
            r_max: g.r_max,
        };
        delta_with_table(gpu, x, ys, segments, view, scratch)
    }
}

impl<T> Drop for SlotPool<T> {
    /// Pinned memory must outlive the copies that read it.
    fn drop(&mut self) {
        for mark in self.staging.iter().filter_map(|stage| stage.busy.as_ref()) {
            // Nothing to do about a failed copy here: the pool is going away.
            let _ = mark.wait();
        }
    }
}
