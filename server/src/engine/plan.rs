//! The scheduling policy, as a pure function: given the running and waiting sequences and this
//! step's budgets, which rows run, who is admitted and who is preempted. No I/O, no tensors.
//!
//! Policy: running sequences keep going, oldest first, decode rows before prefill chunks (so a
//! long prompt never stalls sequences that are generating: its prefill is chunked into whatever
//! token budget is left). Waiting sequences are admitted in arrival order while tokens, sequence
//! slots and KV blocks allow. When a running sequence needs a block and none is free, the newest
//! running sequence is preempted: its blocks are freed and it is recomputed later.

use super::blocks::blocks_for;

pub type SeqId = u64;

/// What the planner needs to know about one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqSched {
    pub id: SeqId,
    /// Tokens known so far (prompt + generated).
    pub len: usize,
    /// Tokens whose K/V are in the cache.
    pub computed: usize,
    /// KV blocks held.
    pub blocks: usize,
}

impl SeqSched {
    fn remaining(&self) -> usize {
        self.len - self.computed.min(self.len)
    }
}

/// The scheduler's view of the engine: running sequences oldest first, waiting ones in the
/// order they should be admitted.
#[derive(Debug, Clone, Default)]
pub struct SchedState {
    pub running: Vec<SeqSched>,
    pub waiting: Vec<SeqSched>,
}

/// Limits for one step.
#[derive(Debug, Clone, Copy)]
pub struct Budgets {
    /// Rows (tokens) in one forward pass.
    pub max_step_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
    pub block_size: usize,
    pub free_blocks: usize,
}

/// Rows of one sequence in this step: `count` tokens starting at its `computed` position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedRows {
    pub id: SeqId,
    pub count: usize,
    /// Blocks to add before running the rows.
    pub new_blocks: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// Running sequences to stop and recompute later (their blocks are freed first).
    pub preempt: Vec<SeqId>,
    /// Waiting sequences that start running this step.
    pub admit: Vec<SeqId>,
    /// Rows to run, in batch order.
    pub rows: Vec<PlannedRows>,
}

impl StepPlan {
    pub fn total_rows(&self) -> usize {
        self.rows.iter().map(|r| r.count).sum()
    }
}

/// Chooses this step's rows. Deterministic in its inputs.
pub fn plan(state: &SchedState, budgets: &Budgets) -> StepPlan {
    let mut out = StepPlan::default();
    let mut free = budgets.free_blocks;
    let mut tokens_left = budgets.max_step_tokens;
    let bs = budgets.block_size;
    // Running sequences still in play (not preempted), oldest first.
    let mut alive: Vec<SeqSched> = state.running.clone();
    let mut scheduled: Vec<SeqId> = Vec::new();

    // Decode rows first, then prefill chunks of running sequences.
    for decode_phase in [true, false] {
        let mut i = 0;
        while i < alive.len() {
            let seq = alive[i];
            let remaining = seq.remaining();
            let is_decode = remaining == 1;
            if remaining == 0 || is_decode != decode_phase || scheduled.contains(&seq.id) {
                i += 1;
                continue;
            }
            let count = remaining.min(tokens_left);
            if count == 0 {
                break;
            }
            let need = blocks_for(seq.computed + count, bs).saturating_sub(seq.blocks);
            // Free blocks by preempting the newest sequence that has no rows yet.
            while need > free {
                let victim = alive.iter().rposition(|s| !scheduled.contains(&s.id));
                match victim {
                    Some(v) => {
                        let victim = alive.remove(v);
                        free += victim.blocks;
                        out.preempt.push(victim.id);
                        if v < i {
                            i -= 1;
                        }
                        if victim.id == seq.id {
                            break;
                        }
                    }
                    None => break,
                }
            }
            if !alive.iter().any(|s| s.id == seq.id) || need > free {
                // This sequence was itself the victim (or nothing could be freed).
                continue;
            }
            free -= need;
            tokens_left -= count;
            scheduled.push(seq.id);
            out.rows.push(PlannedRows { id: seq.id, count, new_blocks: need });
            i += 1;
        }
    }

    // Admission, in order; stop at the first that does not fit so order is kept.
    let mut running = alive.len();
    // Keep a block per running sequence in reserve so admitting does not force an immediate
    // preemption on the next decode step.
    let reserve = running.min(budgets.free_blocks / 8);
    for seq in &state.waiting {
        if running >= budgets.max_running || tokens_left == 0 {
            break;
        }
        let count = seq.remaining().min(tokens_left);
        if count == 0 {
            continue;
        }
        let need = blocks_for(seq.computed + count, bs).saturating_sub(seq.blocks);
        if need + reserve > free {
            break;
        }
        free -= need;
        tokens_left -= count;
        running += 1;
        out.admit.push(seq.id);
        out.rows.push(PlannedRows { id: seq.id, count, new_blocks: need });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(id: SeqId, len: usize, computed: usize, bs: usize) -> SeqSched {
        SeqSched { id, len, computed, blocks: blocks_for(computed, bs) }
    }

    fn budgets(tokens: usize, free: usize) -> Budgets {
        Budgets { max_step_tokens: tokens, max_running: 64, block_size: 4, free_blocks: free }
    }

    #[test]
    fn decode_rows_come_before_prefill_chunks() {
        let state = SchedState { running: vec![seq(1, 100, 10, 4), seq(2, 9, 8, 4)], waiting: vec![] };
        let p = plan(&state, &budgets(16, 100));
        assert_eq!(p.rows[0], PlannedRows { id: 2, count: 1, new_blocks: 1 });
        assert_eq!(p.rows[1].id, 1);
        assert_eq!(p.rows[1].count, 15, "prefill takes what is left of the token budget");
        assert_eq!(p.total_rows(), 16);
    }

    #[test]
    fn long_prompt_is_chunked_and_does_not_block_admission_of_short_decodes() {
        let state = SchedState { running: vec![seq(1, 5, 4, 4)], waiting: vec![seq(2, 1000, 0, 4)] };
        let p = plan(&state, &budgets(64, 1000));
        assert_eq!(p.rows[0].id, 1);
        assert_eq!(p.admit, vec![2]);
        assert_eq!(p.rows[1], PlannedRows { id: 2, count: 63, new_blocks: 16 });
    }

    #[test]
    fn admission_keeps_order_and_respects_limits() {
        let state = SchedState {
            running: vec![],
            waiting: vec![seq(1, 10, 0, 4), seq(2, 10, 0, 4), seq(3, 10, 0, 4)],
        };
        let mut b = budgets(25, 100);
        b.max_running = 2;
        let p = plan(&state, &b);
        assert_eq!(p.admit, vec![1, 2]);
        assert_eq!(p.total_rows(), 20);
        // Not enough blocks for the second: admission stops there.
        let p = plan(&state, &budgets(100, 4));
        assert_eq!(p.admit, vec![1]);
    }

    #[test]
    fn out_of_blocks_preempts_the_newest() {
        // Three decoding sequences, each at a block boundary, no free blocks.
        let state =
            SchedState { running: vec![seq(1, 9, 8, 4), seq(2, 9, 8, 4), seq(3, 9, 8, 4)], waiting: vec![] };
        let p = plan(&state, &budgets(16, 0));
        assert_eq!(p.preempt, vec![3], "the newest is preempted first");
        assert_eq!(p.rows.iter().map(|r| r.id).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(p.rows.iter().map(|r| r.new_blocks).sum::<usize>(), 2);
    }

    #[test]
    fn a_lone_sequence_that_cannot_grow_is_not_scheduled() {
        let state = SchedState { running: vec![seq(1, 9, 8, 4)], waiting: vec![] };
        let p = plan(&state, &budgets(16, 0));
        assert_eq!(p.preempt, vec![1]);
        assert!(p.rows.is_empty());
    }

    #[test]
    fn zero_budget_plans_nothing() {
        let state = SchedState { running: vec![seq(1, 9, 8, 4)], waiting: vec![seq(2, 3, 0, 4)] };
        let p = plan(&state, &budgets(0, 10));
        assert_eq!(p, StepPlan::default());
    }
}
