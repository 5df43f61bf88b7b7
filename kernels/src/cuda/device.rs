//! The `cuda` build of [`Gpu`]: one cudarc context per device with a compute stream and an
//! upload stream, our PTX modules loaded once, and the launches of our kernels (plus a
//! per-segment cuBLAS loop that the benchmarks compare them with).

use std::sync::Arc;
use std::time::Instant;

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    sys::{CUdevice_attribute, CUevent_flags},
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig, PinnedHostSlice, PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use super::attention::{GpuAttentionRows, GpuKvCache, ATTENTION_PARTITION};
use super::model::{GpuPositions, GpuRope};
use super::{DeviceFloat, LaunchPlan, SlotSite, BLOCK_THREADS, EXPAND_ROWS};
use crate::KernelError;

/// Threads per block of the attention kernels (`ATTN_THREADS` in `attention.cu`).
const ATTN_THREADS: u32 = 128;

/// PTX of `kernels/cuda/*.cu`, compiled by nvcc in `build.rs`.
const LORA_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/lora.ptx"));
const ATTENTION_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
const MODEL_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/model.ptx"));

/// Threads per block of `model.cu`'s row kernels (`ROW_THREADS` there).
const ROW_THREADS: u32 = 256;

// SAFETY: `SlotSite` is `repr(C)` plain data (u64 ×3, u32, f32) that the kernels read as such,
// and all-zero bits are a valid (empty) slot.
unsafe impl DeviceRepr for SlotSite {}
unsafe impl ValidAsZeroBits for SlotSite {}

/// Types that can live in a [`DeviceBuf`].
pub trait DeviceElem: DeviceRepr + ValidAsZeroBits + Unpin + Copy + Default {}
impl<T: DeviceRepr + ValidAsZeroBits + Unpin + Copy + Default> DeviceElem for T {}

/// A buffer in device memory.
pub struct DeviceBuf<T> {
    pub(super) slice: CudaSlice<T>,
    /// Elements the buffer stands for: an empty buffer (a rank-0 slot's weights) still holds one
    /// allocated element, because CUDA refuses zero-byte allocations.
    len: usize,
}

impl<T> DeviceBuf<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Page-locked host memory: the source of copies that run while the host goes on.
pub struct PinnedBuf<T> {
    host: PinnedHostSlice<T>,
}

impl<T: DeviceElem> PinnedBuf<T> {
    pub fn len(&self) -> usize {
        self.host.len()
    }

    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }

    /// The memory, for filling. The caller must not touch it while a copy from it may still run
    /// (see [`UploadMark`]).
    pub fn as_mut_slice(&mut self) -> Result<&mut [T], KernelError> {
        self.host.as_mut_slice().map_err(cuda_err("mapping pinned memory"))
    }
}

/// The point the upload stream had reached when it was recorded: everything queued on it
/// before is done once this is.
pub struct UploadMark {
    event: CudaEvent,
}

impl UploadMark {
    /// Whether the uploads before the mark are done, without waiting. `Err` if one failed.
    pub fn is_done(&self) -> Result<bool, KernelError> {
        self.event.try_is_complete().map_err(cuda_err("asking about an upload"))
    }

    /// Waits for the uploads before the mark.
    pub fn wait(&self) -> Result<(), KernelError> {
        self.event.synchronize().map_err(cuda_err("waiting for an upload"))
    }
}

/// An open CUDA device: context, the two streams, and our kernels.
///
/// Every call of this handle runs on the compute stream except the `*_upload*` ones, which run
/// on the upload stream, so that copying an adapter in overlaps the steps. cudarc's automatic
/// cross-stream tracking is off (it would record events on every kernel argument): a buffer is
/// used on the stream that made it, and the one exception, adapter slot memory made on the
/// upload stream and read by kernels through addresses in slot tables, is ordered by
/// [`super::SlotPool`] (kernels see a slot only after its [`UploadMark`] is done; its memory is
/// freed only after [`Gpu::uploads_after_compute`]).
pub struct Gpu {
    stream: Arc<CudaStream>,
    uploads: Arc<CudaStream>,
    lora: Arc<CudaModule>,
    attention: Arc<CudaModule>,
    model: Arc<CudaModule>,
    blas: CudaBlas,
    name: String,
    sm_count: usize,
}

fn cuda_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> KernelError + '_ {
    move |e| KernelError::Cuda(format!("{what}: {e}"))
}

impl Gpu {
    /// Opens device `ordinal` and loads our kernels (the driver JIT-compiles their PTX once).
    pub fn open(ordinal: usize) -> Result<Gpu, KernelError> {
        let ctx = CudaContext::new(ordinal).map_err(cuda_err("opening the CUDA device"))?;
        let name = ctx.name().map_err(cuda_err("reading the device name"))?;
        let sm_count = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(cuda_err("reading the multiprocessor count"))? as usize;
        // SAFETY: no buffer exists yet; how buffers are kept to one stream, or ordered across
        // the two, is said on `Gpu`.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let uploads = ctx.new_stream().map_err(cuda_err("creating the upload stream"))?;
        let lora = ctx.load_module(Ptx::from_src(LORA_PTX)).map_err(cuda_err("loading lora.ptx"))?;
        let attention =
            ctx.load_module(Ptx::from_src(ATTENTION_PTX)).map_err(cuda_err("loading attention.ptx"))?;
        let model = ctx.load_module(Ptx::from_src(MODEL_PTX)).map_err(cuda_err("loading model.ptx"))?;
        let blas =
            CudaBlas::new(stream.clone()).map_err(|e| KernelError::Cuda(format!("starting cuBLAS: {e}")))?;
        Ok(Gpu { stream, uploads, lora, attention, model, blas, name, sm_count })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Streaming multiprocessors of the device.
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }

    pub fn upload<T: DeviceElem>(&self, host: &[T]) -> Result<DeviceBuf<T>, KernelError> {
        if host.is_empty() {
            return self.zeros(0);
        }
        let slice = self.stream.clone_htod(host).map_err(cuda_err("copying to the device"))?;
        Ok(DeviceBuf { slice, len: host.len() })
    }

    pub fn zeros<T: DeviceElem>(&self, len: usize) -> Result<DeviceBuf<T>, KernelError> {
        let slice = self.stream.alloc_zeros(len.max(1)).map_err(cuda_err("allocating device memory"))?;
        Ok(DeviceBuf { slice, len })
    }

    /// Waits for the stream, then copies the buffer back.
    pub fn download<T: DeviceElem>(&self, buf: &DeviceBuf<T>) -> Result<Vec<T>, KernelError> {
        if buf.is_empty() {
            return Ok(Vec::new());
        }
        self.stream.clone_dtoh(&buf.slice).map_err(cuda_err("copying from the device"))
    }

    /// Overwrites the whole buffer with `host` (of the same length).
    pub(super) fn write<T: DeviceElem>(&self, buf: &mut DeviceBuf<T>, host: &[T]) -> Result<(), KernelError> {
        if host.len() != buf.len {
            return Err(KernelError::Shape(format!(
                "writing {} values into a buffer of {}",
                host.len(),
                buf.len
            )));
        }
        if host.is_empty() {
            return Ok(());
        }
        self.stream.memcpy_htod(host, &mut buf.slice).map_err(cuda_err("copying to the device"))
    }

    /// `len` elements of page-locked host memory, zeroed.
    pub fn pinned<T: DeviceElem>(&self, len: usize) -> Result<PinnedBuf<T>, KernelError> {
        // SAFETY: the memory is zeroed below before anything reads it, and all-zero bits are a
        // valid `T` (`ValidAsZeroBits`).
        let mut host = unsafe { self.stream.context().alloc_pinned::<T>(len.max(1)) }
            .map_err(cuda_err("allocating pinned host memory"))?;
        let ptr = host.as_mut_ptr().map_err(cuda_err("mapping pinned memory"))?;
        // SAFETY: `ptr` points to `len.max(1)` elements just allocated and not shared.
        unsafe { std::ptr::write_bytes(ptr, 0, len.max(1)) };
        Ok(PinnedBuf { host })
    }

    /// Queues a copy of `staged[..len]` into a new device buffer on the upload stream and
    /// returns at once. The buffer must not be read on the compute stream before an
    /// [`UploadMark`] recorded after this call is done, and `staged` must not be written before
    /// then either.
    pub(super) fn upload_staged<T: DeviceElem>(
        &self,
        staged: &PinnedBuf<T>,
        len: usize,
    ) -> Result<DeviceBuf<T>, KernelError> {
        if len > staged.len() {
            return Err(KernelError::Shape(format!("uploading {len} values from {} staged", staged.len())));
        }
        // SAFETY: the copy queued next on the same stream overwrites all `len` elements before
        // anything can read them (an empty buffer's one element is never read).
        let mut slice =
            unsafe { self.uploads.alloc::<T>(len.max(1)) }.map_err(cuda_err("allocating device memory"))?;
        if len > 0 {
            let host = staged.host.as_slice().map_err(cuda_err("mapping pinned memory"))?;
            // A pinned source makes this a DMA queued on the stream; the host does not wait.
            self.uploads.memcpy_htod(&host[..len], &mut slice).map_err(cuda_err("copying to the device"))?;
        }
        Ok(DeviceBuf { slice, len })
    }

    /// Marks what the upload stream has been given so far.
    pub(super) fn mark_uploads(&self) -> Result<UploadMark, KernelError> {
        let event = self.uploads.record_event(None).map_err(cuda_err("recording an upload mark"))?;
        Ok(UploadMark { event })
    }

    /// Makes the upload stream wait (on the device; the host goes on) for the work queued on the
    /// compute stream so far: memory freed on the upload stream afterwards is no longer read by
    /// a step.
    pub(super) fn uploads_after_compute(&self) -> Result<(), KernelError> {
        self.uploads.join(&self.stream).map_err(cuda_err("ordering the upload stream"))
    }

    /// The buffer's device address, for [`SlotSite`] records.
    pub(super) fn address<T>(&self, buf: &DeviceBuf<T>) -> u64 {
        let (ptr, _sync) = buf.slice.device_ptr(&self.stream);
        ptr
    }

    pub fn synchronize(&self) -> Result<(), KernelError> {
        self.stream.synchronize().map_err(cuda_err("synchronizing the stream"))
    }

    /// Device milliseconds of the work `f` queues, between two events on the stream; with
    /// `cold`, after overwriting `flush` (larger than the L2 cache) so that the work starts from
    /// DRAM as it would inside a model's step.
    pub fn time_ms(
        &self,
        flush: Option<&mut DeviceBuf<u8>>,
        f: impl FnOnce() -> Result<(), KernelError>,
    ) -> Result<f32, KernelError> {
        if let Some(flush) = flush {
            self.stream.memset_zeros(&mut flush.slice).map_err(cuda_err("flushing the L2 cache"))?;
        }
        let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.stream.record_event(timing).map_err(cuda_err("recording an event"))?;
        f()?;
        let end = self.stream.record_event(timing).map_err(cuda_err("recording an event"))?;
        end.synchronize().map_err(cuda_err("waiting for an event"))?;
        start.elapsed_ms(&end).map_err(cuda_err("reading event times"))
    }

    /// Device-to-device copy bandwidth in bytes per second (read plus written), from `reps`
    /// copies of a `bytes`-long buffer: the memory-bandwidth bound the kernels are measured by.
    pub fn copy_bandwidth(&self, bytes: usize, reps: usize) -> Result<f64, KernelError> {
        let src = self.zeros::<u8>(bytes)?;
        let mut dst = self.zeros::<u8>(bytes)?;
        let copy = |dst: &mut DeviceBuf<u8>| {
            self.stream.memcpy_dtod(&src.slice, &mut dst.slice).map_err(cuda_err("device-to-device copy"))
        };
        copy(&mut dst)?;
        self.synchronize()?;
        let start = Instant::now();
        for _ in 0..reps {
            copy(&mut dst)?;
        }
        self.synchronize()?;
        Ok((2 * bytes * reps) as f64 / start.elapsed().as_secs_f64())
    }

    /// Launches shrink then one expand per site (see `lora.cu`); shapes were validated by the
    /// caller ([`super::lora_delta`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_lora<T: DeviceFloat>(
        &self,
        x: &DeviceBuf<T>,
        rows: usize,
        in_features: usize,
        ys: &mut [(&mut DeviceBuf<T>, usize)],
        meta: &DeviceBuf<u32>,
        table: &DeviceBuf<SlotSite>,
        n_slots: usize,
        r_max: usize,
        plan: LaunchPlan,
        scratch: &mut DeviceBuf<f32>,
    ) -> Result<(), KernelError> {
        let (rows_u, in_u, slots_u, rmax_u) = (rows as u32, in_features as u32, n_slots as u32, r_max as u32);
        let shrink = self.function(&self.lora, &format!("lora_shrink_{}", T::SUFFIX))?;
        let mut launch = self.stream.launch_builder(&shrink);
        launch
            .arg(&x.slice)
            .arg(&rows_u)
            .arg(&in_u)
            .arg(&meta.slice)
            .arg(&table.slice)
            .arg(&slots_u)
            .arg(&mut scratch.slice)
            .arg(&rmax_u)
            .arg(&plan.split_len);
        let cfg = LaunchConfig {
            grid_dim: (plan.splits, slots_u, ys.len() as u32),
            block_dim: (BLOCK_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument list matches `lora_shrink_*`'s signature; every buffer was sized
        // by `lora_delta` (x: rows·in, scratch: plan.scratch_len, table: sites·n_slots) and every
        // address in `table` points into a live buffer of the sizes its record states
        // (`SlotTable::new` checked them and borrows the buffers).
        unsafe { launch.launch(cfg) }.map_err(cuda_err("launching lora_shrink"))?;

        let expand = self.function(&self.lora, &format!("lora_expand_{}", T::SUFFIX))?;
        for (site, (y, out_features)) in ys.iter_mut().enumerate() {
            let site_table = table.slice.slice(site * n_slots..(site + 1) * n_slots);
            let (out_u, site_u) = (*out_features as u32, site as u32);
            let mut launch = self.stream.launch_builder(&expand);
            launch
                .arg(&mut y.slice)
                .arg(&rows_u)
                .arg(&out_u)
                .arg(&meta.slice)
                .arg(&site_table)
                .arg(&slots_u)
                .arg(&scratch.slice)
                .arg(&rmax_u)
                .arg(&plan.splits)
                .arg(&site_u);
            let cfg = LaunchConfig {
                grid_dim: (out_u.div_ceil(BLOCK_THREADS), slots_u, 1),
                block_dim: (BLOCK_THREADS, 1, 1),
                shared_mem_bytes: (EXPAND_ROWS * r_max * std::mem::size_of::<f32>()) as u32,
            };
            // SAFETY: as for the shrink; y holds rows·out_features and the shared memory is the
            // EXPAND_ROWS·r_max floats the kernel indexes.
            unsafe { launch.launch(cfg) }.map_err(cuda_err("launching lora_expand"))?;
        }
        Ok(())
    }

    fn function(&self, module: &Arc<CudaModule>, name: &str) -> Result<CudaFunction, KernelError> {
        module.load_function(name).map_err(cuda_err("finding a kernel in our PTX"))
    }

    /// Launches `kv_write_*` (shapes validated by [`super::attention::write_kv`]).
    pub(super) fn launch_kv_write<T: DeviceFloat>(
        &self,
        cache: &mut GpuKvCache<T>,
        k: &DeviceBuf<T>,
        v: &DeviceBuf<T>,
        rows: &GpuAttentionRows,
        width: usize,
    ) -> Result<(), KernelError> {
        let f = self.function(&self.attention, &format!("kv_write_{}", T::SUFFIX))?;
        let (width_u, bs_u) = (width as u32, cache.geometry().block_size as u32);
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(&k.slice)
            .arg(&v.slice)
            .arg(&rows.pos.slice)
            .arg(&rows.table.slice)
            .arg(&rows.blocks.slice)
            .arg(&width_u)
            .arg(&bs_u)
            .arg(&mut cache.k.slice)
            .arg(&mut cache.v.slice);
        let cfg = LaunchConfig {
            grid_dim: (rows.rows as u32, 1, 1),
            block_dim: (ATTN_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `kv_write_*`; k and v hold rows·width values and every
        // (block, slot) the rows address was checked against the cache by `GpuAttentionRows::new`.
        unsafe { launch.launch(cfg) }.map_err(cuda_err("launching kv_write"))?;
        Ok(())
    }

    /// Launches `paged_attention_partial_*` then `paged_attention_reduce_*` (shapes and scratch
    /// sizes ensured by [`super::attention::paged_attention`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_attention<T: DeviceFloat>(
        &self,
        cache: &GpuKvCache<T>,
        q: &DeviceBuf<T>,
        n_heads: usize,
        scale: f32,
        rows: &GpuAttentionRows,
        partitions: usize,
        out: &mut DeviceBuf<T>,
        (m, l, acc): (&mut DeviceBuf<f32>, &mut DeviceBuf<f32>, &mut DeviceBuf<f32>),
    ) -> Result<(), KernelError> {
        let geom = cache.geometry();
        let n_rep = n_heads / geom.n_kv_heads;
        let (heads_u, kv_u, dim_u, bs_u, parts_u) = (
            n_heads as u32,
            geom.n_kv_heads as u32,
            geom.head_dim as u32,
            geom.block_size as u32,
            partitions as u32,
        );
        let partial = self.function(&self.attention, &format!("paged_attention_partial_{}", T::SUFFIX))?;
        let mut launch = self.stream.launch_builder(&partial);
        launch
            .arg(&q.slice)
            .arg(&cache.k.slice)
            .arg(&cache.v.slice)
            .arg(&rows.pos.slice)
            .arg(&rows.table.slice)
            .arg(&rows.blocks.slice)
            .arg(&heads_u)
            .arg(&kv_u)
            .arg(&dim_u)
            .arg(&bs_u)
            .arg(&scale)
            .arg(&mut m.slice)
            .arg(&mut l.slice)
            .arg(&mut acc.slice);
        let cfg = LaunchConfig {
            grid_dim: (rows.rows as u32, kv_u, parts_u),
            block_dim: (ATTN_THREADS, 1, 1),
            shared_mem_bytes: (n_rep * (geom.head_dim + ATTENTION_PARTITION) * std::mem::size_of::<f32>())
                as u32,
        };
        // SAFETY: the arguments match `paged_attention_partial_*`; q holds rows·n_heads·head_dim
        // values, the scratch rows·n_heads·partitions (·head_dim for acc), the shared memory the
        // n_rep·(head_dim + PART) floats the kernel indexes, and every block the rows address
        // was checked against the cache.
        unsafe { launch.launch(cfg) }.map_err(cuda_err("launching paged_attention_partial"))?;

        let reduce = self.function(&self.attention, &format!("paged_attention_reduce_{}", T::SUFFIX))?;
        let mut launch = self.stream.launch_builder(&reduce);
        launch
            .arg(&rows.pos.slice)
            .arg(&heads_u)
            .arg(&dim_u)
            .arg(&parts_u)
            .arg(&m.slice)
            .arg(&l.slice)
            .arg(&acc.slice)
            .arg(&mut out.slice);
        let cfg = LaunchConfig {
            grid_dim: (rows.rows as u32, heads_u, 1),
            block_dim: (dim_u, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as above; out holds rows·n_heads·head_dim values and head_dim ≤ 1024 threads.
        unsafe { launch.launch(cfg) }.map_err(cuda_err("launching paged_attention_reduce"))?;
        Ok(())
    }

    /// A grid-stride launch over `n` elements: enough blocks to fill the device a few times.
    fn elementwise(&self, n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(ROW_THREADS as usize).clamp(1, 8 * self.sm_count.max(1));
        LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 }
    }

    /// One block of `ROW_THREADS` per row.
    fn per_row(rows: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 }
    }

    /// Launches `gather_rows_*` (indices and shapes checked by [`super::model::gather_rows`]).
    pub(super) fn launch_gather<T: DeviceFloat>(
        &self,
        src: &DeviceBuf<T>,
        idx: &DeviceBuf<u32>,
        width: usize,
        out: &mut DeviceBuf<T>,
    ) -> Result<(), KernelError> {
        let f = self.function(&self.model, &format!("gather_rows_{}", T::SUFFIX))?;
        let width_u = width as u32;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(&src.slice).arg(&idx.slice).arg(&width_u).arg(&mut out.slice);
        // SAFETY: the arguments match `gather_rows_*`; every index names a row of src and out
        // holds idx.len() rows of width.
        unsafe { launch.launch(Self::per_row(idx.len())) }.map_err(cuda_err("launching gather_rows"))?;
        Ok(())
    }

    /// Launches `residual_rms_norm_*` (shapes checked by [`super::model::rms_norm`]).
    pub(super) fn launch_rms_norm<T: DeviceFloat>(
        &self,
        x: &mut DeviceBuf<T>,
        delta: Option<&DeviceBuf<T>>,
        weight: &DeviceBuf<f32>,
        width: usize,
        eps: f32,
        out: &mut DeviceBuf<T>,
    ) -> Result<(), KernelError> {
        let f = self.function(&self.model, &format!("residual_rms_norm_{}", T::SUFFIX))?;
        let (width_u, rows) = (width as u32, x.len / width);
        let no_delta = 0u64;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(&mut x.slice);
        match delta {
            Some(d) => launch.arg(&d.slice),
            None => launch.arg(&no_delta),
        };
        launch.arg(&weight.slice).arg(&width_u).arg(&eps).arg(&mut out.slice);
        // SAFETY: the arguments match `residual_rms_norm_*` (a null delta is allowed); x, delta
        // and out hold rows·width values and weight width.
        unsafe { launch.launch(Self::per_row(rows)) }.map_err(cuda_err("launching residual_rms_norm"))?;
        Ok(())
    }

    /// Launches `rope_*` (shapes and positions checked by [`super::model::rope`]).
    pub(super) fn launch_rope<T: DeviceFloat>(
        &self,
        x: &mut DeviceBuf<T>,
        positions: &GpuPositions,
        rope: &GpuRope,
        n_heads: usize,
        half: usize,
    ) -> Result<(), KernelError> {
        let f = self.function(&self.model, &format!("rope_{}", T::SUFFIX))?;
        let (heads_u, half_u) = (n_heads as u32, half as u32);
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(&mut x.slice)
            .arg(&positions.pos.slice)
            .arg(&rope.cos.slice)
            .arg(&rope.sin.slice)
            .arg(&heads_u)
            .arg(&half_u);
        // SAFETY: the arguments match `rope_*`; x holds rows·n_heads·2·half values and every
        // position is below the tables' length (GpuRope::positions checked it).
        unsafe { launch.launch(Self::per_row(positions.pos.len)) }.map_err(cuda_err("launching rope"))?;
        Ok(())
    }

    /// Launches `silu_mul_*` over equally long buffers.
    pub(super) fn launch_silu_mul<T: DeviceFloat>(
        &self,
        gate: &mut DeviceBuf<T>,
        up: &DeviceBuf<T>,
    ) -> Result<(), KernelError> {
        let f = self.function(&self.model, &format!("silu_mul_{}", T::SUFFIX))?;
        let n = gate.len as u64;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(&mut gate.slice).arg(&up.slice).arg(&n);
        // SAFETY: the arguments match `silu_mul_*`; both buffers hold n values.
        unsafe { launch.launch(self.elementwise(gate.len)) }.map_err(cuda_err("launching silu_mul"))?;
        Ok(())
    }

    /// Launches `add_bias_*`: y `[rows, width]`, bias `[width]`.
    pub(super) fn launch_add_bias<T: DeviceFloat>(
        &self,
        y: &mut DeviceBuf<T>,
        bias: &DeviceBuf<T>,
        rows: usize,
        width: usize,
    ) -> Result<(), KernelError> {
        let f = self.function(&self.model, &format!("add_bias_{}", T::SUFFIX))?;
        let (rows_u, width_u) = (rows as u64, width as u32);
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(&mut y.slice).arg(&bias.slice).arg(&rows_u).arg(&width_u);
        // SAFETY: the arguments match `add_bias_*`; y holds rows·width values, bias width.
        unsafe { launch.launch(self.elementwise(rows * width)) }.map_err(cuda_err("launching add_bias"))?;
        Ok(())
    }

    /// Launches `fill_uniform_*` over the whole buffer.
    pub(super) fn launch_fill_uniform<T: DeviceFloat>(
        &self,
        buf: &mut DeviceBuf<T>,
        seed: u32,
        scale: f32,
    ) -> Result<(), KernelError> {
        let f = self.function(&self.model, &format!("fill_uniform_{}", T::SUFFIX))?;
        let n = buf.len as u64;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(&mut buf.slice).arg(&n).arg(&seed).arg(&scale);
        // SAFETY: the arguments match `fill_uniform_*`; buf holds n values.
        unsafe { launch.launch(self.elementwise(buf.len)) }.map_err(cuda_err("launching fill_uniform"))?;
        Ok(())
    }

    /// `c[m, n] = alpha · a[m, k] · b[n, k]ᵀ + beta · c` on row-major buffers: one cuBLAS gemm.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm_abt<T: DeviceFloat>(
        &self,
        a: &DeviceBuf<T>,
        a_offset: usize,
        b: &DeviceBuf<T>,
        c: &mut DeviceBuf<T>,
        c_offset: usize,
        (m, n, k): (usize, usize, usize),
        (alpha, beta): (f32, f32),
    ) -> Result<(), KernelError> {
        // Row-major C = A·Bᵀ is column-major Cᵀ = B·Aᵀ: cuBLAS computes op(B) = Bᵀ-as-stored
        // transposed, times A-as-stored.
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha: T::from_f32(alpha),
            lda: k as i32,
            ldb: k as i32,
            beta: T::from_f32(beta),
            ldc: n as i32,
        };
        let a_view = a.slice.slice(a_offset..a_offset + m * k);
        let mut c_view = c.slice.slice_mut(c_offset..c_offset + m * n);
        // SAFETY: the views hold exactly the m·k, n·k (b, checked by the caller) and m·n elements
        // the configuration addresses.
        unsafe { T::gemm(&self.blas, cfg, &b.slice, &a_view, &mut c_view) }
            .map_err(|e| KernelError::Cuda(format!("cuBLAS gemm: {e}")))
    }
}

/// The element types cuBLAS multiplies for the baseline.
pub trait BlasFloat: Sized {
    /// # Safety
    /// As [`Gemm::gemm`]: the buffers must hold what `cfg` addresses.
    unsafe fn gemm<A: DevicePtr<Self>, B: DevicePtr<Self>, C: cudarc::driver::DevicePtrMut<Self>>(
        blas: &CudaBlas,
        cfg: GemmConfig<Self>,
        a: &A,
        b: &B,
        c: &mut C,
    ) -> Result<(), cudarc::cublas::result::CublasError>;
}

macro_rules! blas_float {
    ($($t:ty),*) => {$(
        impl BlasFloat for $t {
            unsafe fn gemm<A: DevicePtr<Self>, B: DevicePtr<Self>, C: cudarc::driver::DevicePtrMut<Self>>(
                blas: &CudaBlas,
                cfg: GemmConfig<Self>,
                a: &A,
                b: &B,
                c: &mut C,
            ) -> Result<(), cudarc::cublas::result::CublasError> {
                // SAFETY: forwarded from the caller.
                unsafe { Gemm::<$t>::gemm(blas, cfg, a, b, c) }
            }
        }
    )*};
}
blas_float!(f32, half::f16, half::bf16);
