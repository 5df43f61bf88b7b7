//! The host-side parts of the GPU path that need no device: segment tables and launch plans.

use super::attention::pack_rows;
use super::*;
use crate::attention::{KvGeometry, SeqRows};

#[test]
fn segments_pack_in_the_kernels_layout() {
    let meta = pack_segments(10, 4, &[(2..5, 3), (5..9, 0), (9..9, 1)]).expect("valid segments");
    assert_eq!(meta, vec![3, 2, 5, 3, 5, 9, 0, 9, 9, 1]);
    assert_eq!(pack_segments(0, 0, &[]).expect("an empty step"), vec![0]);
}

#[test]
fn bad_segments_are_rejected_by_name() {
    let err = |r| pack_segments(10, 3, r).expect_err("must be rejected").to_string();
    assert!(err(&[(0..4, 0), (3..6, 1)]).contains("segment 1"), "overlap");
    assert!(err(&[(5..8, 0), (0..6, 1)]).contains("overlap"), "overlap out of order");
    assert!(err(&[(0..11, 0)]).contains("not within 0..10"));
    #[allow(clippy::reversed_empty_ranges)]
    let reversed = err(&[(4..2, 0)]);
    assert!(reversed.contains("segment 0"));
    assert!(err(&[(0..2, 3)]).contains("slot 3"));
    assert!(err(&[(0..1, 0), (1..2, 1), (2..3, 2), (3..4, 0)]).contains("4 segments for a pool of 3"));
    // An empty segment sorted between two overlapping ones does not hide the overlap.
    assert!(err(&[(0..5, 0), (3..3, 1), (4..8, 2)]).contains("overlap"));
    assert!(pack_segments(10, MAX_SLOTS + 1, &[]).is_err(), "grid limit");
    // Empty segments never overlap anything.
    pack_segments(10, 3, &[(0..4, 0), (2..2, 1)]).expect("an empty segment inside another is harmless");
}

#[test]
fn launch_plans_cover_in_features_and_depend_only_on_the_pool() {
    for in_features in [1, 7, 8, 255, 576, 1536, 4096, 11008, 14336] {
        for (n_slots, sites) in [(1, 1), (1, 3), (8, 2), (64, 3), (1000, 1)] {
            let p = LaunchPlan::new(n_slots, sites, in_features, 132);
            assert!(p.splits >= 1 && p.split_len.is_multiple_of(8), "{p:?}");
            let (splits, len) = (p.splits as usize, p.split_len as usize);
            assert!(splits * len >= in_features, "{in_features}: {p:?} leaves elements out");
            assert!((splits - 1) * len < in_features, "{in_features}: {p:?} has an empty slice");
        }
    }
    // Few slots on a big device split the reduction; a full pool does not need to.
    assert!(LaunchPlan::new(1, 1, 4096, 132).splits >= 8);
    assert_eq!(LaunchPlan::new(512, 1, 4096, 132).splits, 1);
    assert_eq!(
        LaunchPlan::new(4, 3, 4096, 132).scratch_len(3, 5, 16),
        3 * LaunchPlan::new(4, 3, 4096, 132).splits as usize * 5 * 16
    );
}

#[cfg(not(feature = "cuda"))]
#[test]
fn without_the_feature_opening_a_gpu_says_why() {
    let err = Gpu::open(0).err().expect("no GPU in a build without cuda").to_string();
    assert!(err.contains("--features cuda"), "{err}");
}

#[test]
fn attention_rows_pack_positions_and_block_tables() {
    let geom = KvGeometry { block_size: 4, n_kv_heads: 1, head_dim: 8 };
    let (t0, t1) = ([5u32, 2], [7u32, 0, 3]);
    let seqs = [
        SeqRows { rows: 0..2, start_pos: 5, block_table: &t0 },
        SeqRows { rows: 3..4, start_pos: 9, block_table: &t1 },
    ];
    let p = pack_rows(geom, 8, 5, &seqs, RowsFor::Attention).expect("valid rows");
    assert_eq!(p.pos, vec![5, 6, u32::MAX, 9, u32::MAX]);
    assert_eq!(p.table, vec![0, 0, 0, 2, 0]);
    assert_eq!(p.blocks, vec![5, 2, 7, 0, 3]);
    assert_eq!(p.longest, 10);
    // A block table too short for the row's position, or a block outside the pool, is refused.
    let short = [SeqRows { rows: 0..1, start_pos: 8, block_table: &t0 }];
    assert!(pack_rows(geom, 8, 1, &short, RowsFor::Write).is_err());
    assert!(pack_rows(geom, 6, 5, &seqs, RowsFor::Attention).is_err(), "block 7 of 6");
    assert_eq!(pack_rows(geom, 8, 2, &[], RowsFor::Attention).expect("no sequences").blocks, vec![0]);
    // A write checks only the blocks it writes: an earlier block outside the pool (freed by a
    // sliding window, say) is refused for attention only.
    let window = [9u32, 1];
    let late = [SeqRows { rows: 0..1, start_pos: 5, block_table: &window }];
    pack_rows(geom, 8, 1, &late, RowsFor::Write).expect("a write into block 1");
    assert!(pack_rows(geom, 8, 1, &late, RowsFor::Attention).is_err());
}
