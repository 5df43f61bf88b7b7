//! The build without the `cuda` feature: the same [`Gpu`] API, whose [`Gpu::open`] always fails,
//! so no [`Gpu`] or [`DeviceBuf`] can exist and every other method is unreachable.

use std::marker::PhantomData;

use super::attention::{GpuAttentionRows, GpuKvCache};
use super::model::{GpuPositions, GpuRope};
use super::{DeviceFloat, LaunchPlan, SlotSite};
use crate::KernelError;

/// No value of this type exists.
enum Never {}

/// Types that can live in a [`DeviceBuf`].
pub trait DeviceElem: Copy + Default {}
impl<T: Copy + Default> DeviceElem for T {}

/// The element types cuBLAS multiplies for the baseline (all of them, in this build).
pub trait BlasFloat {}
impl<T> BlasFloat for T {}

/// A buffer in device memory (none exist in this build).
pub struct DeviceBuf<T> {
    never: Never,
    _t: PhantomData<T>,
}

impl<T> DeviceBuf<T> {
    pub fn len(&self) -> usize {
        match self.never {}
    }

    pub fn is_empty(&self) -> bool {
        match self.never {}
    }
}

/// Page-locked host memory (none exists in this build).
pub struct PinnedBuf<T> {
    never: Never,
    _t: PhantomData<T>,
}

impl<T: DeviceElem> PinnedBuf<T> {
    pub fn len(&self) -> usize {
        match self.never {}
    }

    pub fn is_empty(&self) -> bool {
        match self.never {}
    }

    pub fn as_mut_slice(&mut self) -> Result<&mut [T], KernelError> {
        match self.never {}
    }
}

/// A point on the upload stream (none exists in this build).
pub struct UploadMark {
    never: Never,
}

impl UploadMark {
    pub fn is_done(&self) -> Result<bool, KernelError> {
        match self.never {}
    }

    pub fn wait(&self) -> Result<(), KernelError> {
        match self.never {}
    }
}

/// An open CUDA device (none can be opened in this build).
pub struct Gpu {
    never: Never,
}

impl Gpu {
    /// Always `Err`: this build has no CUDA support.
    pub fn open(_ordinal: usize) -> Result<Gpu, KernelError> {
        Err(KernelError::Cuda("this build has no CUDA support (build with `--features cuda`)".into()))
    }

    pub fn name(&self) -> &str {
        match self.never {}
    }

    pub fn sm_count(&self) -> usize {
        match self.never {}
    }

    pub fn upload<T: DeviceElem>(&self, _host: &[T]) -> Result<DeviceBuf<T>, KernelError> {
        match self.never {}
    }

    pub fn zeros<T: DeviceElem>(&self, _len: usize) -> Result<DeviceBuf<T>, KernelError> {
        match self.never {}
    }

    pub fn download<T: DeviceElem>(&self, _buf: &DeviceBuf<T>) -> Result<Vec<T>, KernelError> {
        match self.never {}
    }

    pub(super) fn write<T: DeviceElem>(
        &self,
        _buf: &mut DeviceBuf<T>,
        _host: &[T],
    ) -> Result<(), KernelError> {
        match self.never {}
    }

    pub fn pinned<T: DeviceElem>(&self, _len: usize) -> Result<PinnedBuf<T>, KernelError> {
        match self.never {}
    }

    pub(super) fn upload_staged<T: DeviceElem>(
        &self,
        _staged: &PinnedBuf<T>,
        _len: usize,
    ) -> Result<DeviceBuf<T>, KernelError> {
        match self.never {}
    }

    pub(super) fn mark_uploads(&self) -> Result<UploadMark, KernelError> {
        match self.never {}
    }

    pub(super) fn uploads_after_compute(&self) -> Result<(), KernelError> {
        match self.never {}
    }

    pub(super) fn address<T>(&self, _buf: &DeviceBuf<T>) -> u64 {
        match self.never {}
    }

    pub fn synchronize(&self) -> Result<(), KernelError> {
        match self.never {}
    }

    pub fn copy_bandwidth(&self, _bytes: usize, _reps: usize) -> Result<f64, KernelError> {
        match self.never {}
    }

    pub fn time_ms(
        &self,
        _flush: Option<&mut DeviceBuf<u8>>,
        _f: impl FnOnce() -> Result<(), KernelError>,
    ) -> Result<f32, KernelError> {
        match self.never {}
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_lora<T: DeviceFloat>(
        &self,
        _x: &DeviceBuf<T>,
        _rows: usize,
        _in_features: usize,
        _ys: &mut [(&mut DeviceBuf<T>, usize)],
        _meta: &DeviceBuf<u32>,
        _table: &DeviceBuf<SlotSite>,
        _n_slots: usize,
        _r_max: usize,
        _plan: LaunchPlan,
        _scratch: &mut DeviceBuf<f32>,
    ) -> Result<(), KernelError> {
        match self.never {}
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm_abt<T: DeviceFloat>(
        &self,
        _a: &DeviceBuf<T>,
        _a_offset: usize,
        _b: &DeviceBuf<T>,
        _c: &mut DeviceBuf<T>,
        _c_offset: usize,
        _mnk: (usize, usize, usize),
        _alpha_beta: (f32, f32),
    ) -> Result<(), KernelError> {
        match self.never {}
    }

    pub(super) fn launch_kv_write<T: DeviceFloat>(
        &self,
        _cache: &mut GpuKvCache<T>,
        _k: &DeviceBuf<T>,
        _v: &DeviceBuf<T>,
        _rows: &GpuAttentionRows,
        _width: usize,
    ) -> Result<(), KernelError> {
        match self.never {}
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_attention<T: DeviceFloat>(
        &self,
        _cache: &GpuKvCache<T>,
        _q: &DeviceBuf<T>,
        _n_heads: usize,
        _scale: f32,
        _rows: &GpuAttentionRows,
        _partitions: usize,
        _out: &mut DeviceBuf<T>,
        _scratch: (&mut DeviceBuf<f32>, &mut DeviceBuf<f32>, &mut DeviceBuf<f32>),
    ) -> Result<(), KernelError> {
        match self.never {}
    }

    pub(super) fn launch_gather<T: DeviceFloat>(
        &self,
        _src: &DeviceBuf<T>,
        _idx: &DeviceBuf<u32>,
        _width: usize,
        _out: &mut DeviceBuf<T>,
    ) -> Result<(), KernelError> {
        match self.never {}
    }

    pub(super) fn launch_rms_norm<T: DeviceFloat>(
        &self,
        _x: &mut DeviceBuf<T>,
        _delta: Option<&DeviceBuf<T>>,
        _weight: &DeviceBuf<f32>,
        _width: usize,
        _eps: f32,
        _out: &mut DeviceBuf<T>,
    ) -> Result<(), KernelError> {
        match self.never {}
    }

    pub(super) fn launch_rope<T: DeviceFloat>(
        &self,
        _x: &mut DeviceBuf<T>,
        _positions: &GpuPositions,
        _rope: &GpuRope,
        _n_heads: usize,
        _half: usize,
    ) -> Result<(), KernelError> {
        match self.never {}
    }

    pub(super) fn launch_silu_mul<T: DeviceFloat>(
        &self,
        _gate: &mut DeviceBuf<T>,
        _up: &DeviceBuf<T>,
    ) -> Result<(), KernelError> {
        match self.never {}
    }

    pub(super) fn launch_add_bias<T: DeviceFloat>(
        &self,
        _y: &mut DeviceBuf<T>,
        _bias: &DeviceBuf<T>,
        _rows: usize,
        _width: usize,
    ) -> Result<(), KernelError> {
        match self.never {}
    }

    pub(super) fn launch_fill_uniform<T: DeviceFloat>(
        &self,
        _buf: &mut DeviceBuf<T>,
        _seed: u32,
        _scale: f32,
    ) -> Result<(), KernelError> {
        match self.never {}
    }
}
