//! Compiles `cuda/*.cu` to PTX with nvcc when the `cuda` feature is on; CPU builds need no CUDA.

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// Sources under `cuda/`, each compiled to `$OUT_DIR/NAME.ptx`.
const KERNELS: &[&str] = &["lora", "attention", "model"];

fn main() {
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = env::var("NVCC").unwrap_or_else(|_| match env::var("CUDA_HOME") {
        Ok(home) => format!("{home}/bin/nvcc"),
        Err(_) => "nvcc".into(),
    });
    // 90: H100/H200. The PTX is JIT-compiled by the driver for the actual device, which must be of
    // this compute capability or newer.
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    for name in KERNELS {
        let src = format!("cuda/{name}.cu");
        let ptx = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["-ptx", "-O3", "-std=c++17", &format!("-arch=sm_{cap}"), &src, "-o"])
            .arg(&ptx)
            .status()
            .unwrap_or_else(|e| panic!("running {nvcc} (see scripts/cuda-env.sh): {e}"));
        assert!(status.success(), "nvcc failed on {src}");
    }
}
