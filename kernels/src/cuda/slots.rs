//! The device tier of the adapter cache as the kernels see it: a fixed number of slots, each
//! holding one adapter's `A`, `B` (and DoRA factors) for every site in one device buffer, and per
//! site group (one layer's q/k/v, say) the `[sites][n_slots]` slot table that [`super::lora_delta`]'s
//! kernels read, kept in step with the slots.
//!
//! Which adapter sits in which slot, and when one may be replaced, is the caller's business: a slot
//! must not be reloaded while queued work still reads the old table, which holds on one stream
//! because every launch and every copy of a [`Gpu`] is ordered on it, and a reload frees the old
//! buffer only in stream order.

use super::{delta_with_table, DeviceBuf, DeviceFloat, Gpu, GpuSegments, LoraScratch, SlotSite, TableView};
use super::{MAX_RANK, MAX_SLOTS};
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

/// `n_slots` adapter slots over a fixed list of site groups.
pub struct SlotPool<T> {
    n_slots: usize,
    groups: Vec<Group>,
    slots: Vec<Option<SlotMemory<T>>>,
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
        Ok(SlotPool { n_slots, groups, slots: (0..n_slots).map(|_| None).collect() })
    }

    pub fn n_slots(&self) -> usize {
        self.n_slots
    }

    /// Device bytes held by the slots' weights.
    pub fn weight_bytes(&self) -> usize {
        self.slots
            .iter()
            .flatten()
            .map(|m| {
                m.weights.len() * std::mem::size_of::<T>()
                    + m.dora_factors.as_ref().map_or(0, |d| d.len() * std::mem::size_of::<f32>())
            })
            .sum()
    }

    /// Puts one adapter in `slot`, replacing what was there: `sites[g][s]` is site `s` of group `g`
    /// (`None`: the adapter leaves that projection alone). Everything is checked before anything
    /// is uploaded; `Err` names the group and site and leaves the slot as it was. The tables
    /// change on the next [`SlotPool::sync`].
    pub fn load(
        &mut self,
        gpu: &Gpu,
        slot: usize,
        sites: &[Vec<Option<HostSite<'_>>>],
    ) -> Result<(), KernelError> {
        self.check_load(slot, sites)?;
        let mut weights: Vec<T> = Vec::new();
        let mut dora: Vec<f32> = Vec::new();
        // (group, site, A offset, B offset, DoRA offset) of each present site.
        let mut placed = Vec::new();
        for (g, group_sites) in sites.iter().enumerate() {
            for (s, site) in group_sites.iter().enumerate() {
                let Some(site) = site else { continue };
                let a_at = weights.len();
                weights.extend(site.a.iter().map(|&v| T::from_f32(v)));
                let b_at = weights.len();
                weights.extend(site.b.iter().map(|&v| T::from_f32(v)));
                let dora_at = site.dora.map(|factor| {
                    let at = dora.len();
                    dora.extend_from_slice(factor);
                    at
                });
                placed.push((g, s, a_at, b_at, dora_at, site.rank, site.scale));
            }
        }
        let weight_buf = gpu.upload(&weights)?;
        let dora_buf = if dora.is_empty() { None } else { Some(gpu.upload(&dora)?) };
        let base = gpu.address(&weight_buf);
        let dora_base = dora_buf.as_ref().map_or(0, |d| gpu.address(d));
        let elem = std::mem::size_of::<T>() as u64;
        self.clear(slot);
        for (g, s, a_at, b_at, dora_at, rank, scale) in placed {
            let group = &mut self.groups[g];
            group.records[s * self.n_slots + slot] = SlotSite {
                a: base + a_at as u64 * elem,
                b: base + b_at as u64 * elem,
                dora: dora_at.map_or(0, |at| dora_base + at as u64 * 4),
                rank: rank as u32,
                scale,
            };
        }
        self.slots[slot] = Some(SlotMemory { weights: weight_buf, dora_factors: dora_buf });
        Ok(())
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

    /// Empties `slot`: its rows get no delta until something is loaded there again. Its memory
    /// is freed in stream order, after the work already queued.
    pub fn clear(&mut self, slot: usize) {
        if slot >= self.n_slots {
            return;
        }
        for group in &mut self.groups {
            for s in 0..group.out_features.len() {
                group.records[s * self.n_slots + slot] = SlotSite::default();
            }
            group.dirty = true;
        }
        self.slots[slot] = None;
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
