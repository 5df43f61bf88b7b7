//! Process-wide settings of the libraries lorahost computes with.

/// candle runs element-wise CPU ops on its own pool of spinning threads, next to rayon's (which
/// lorahost's kernels and candle's matmuls use). On a machine with few cores the two pools fight
/// for them: training on 2 cores ran 3-4× slower with candle's pool than without. Unless the
/// user chose (`CANDLE_NUM_THREADS`), candle's pool gets no extra threads; matmuls stay parallel.
/// Call before the first candle op (it reads the variable once).
pub fn default_candle_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// candle asks how many threads a matmul may use on every f32 matmul, and unless
/// `RAYON_NUM_THREADS` is set it works the answer out from /proc/cpuinfo each time: thousands of
/// reads per training step (~6 % of it on a 2-core host). This computes candle's answer once and
/// pins it in that variable. Call after the global rayon pool is configured (the global pool is
/// built here first if it is not, so the variable does not resize it) and before other threads
/// read the environment.
pub fn pin_candle_matmul_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        let _ = rayon::current_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
}
