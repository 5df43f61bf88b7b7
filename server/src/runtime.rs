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
