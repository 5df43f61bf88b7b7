//! The scheduling policy, as a pure function: given the running and waiting sequences and this
//! step's budgets, which rows run, who is admitted and who is preempted. No I/O, no tensors.
//!
//! Policy: running sequences keep going, oldest first, decode rows before prefill chunks (so a
//! long prompt never stalls sequences that are generating: its prefill is chunked into whatever
//! token budget is left). Preempted sequences are re-admitted first, in order. Then new
//! sequences are admitted fairly (`fair`: the tenant with the least service so far, then its
//! account with the least, then that account's oldest request) while tokens, sequence slots and
//! KV blocks allow; admission
//! stops at the first chosen request that does not fit, so a large request is never overtaken
//! forever by smaller ones. When a running sequence needs a block and none is free, the newest
//! running sequence is preempted: its blocks are freed and it is recomputed later.

use super::blocks::blocks_for;
use super::fair::{admission_cost, ClientId, FairShare};
use std::collections::{HashMap, VecDeque};

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
    /// Who the sequence is accounted to for fairness.
    pub client: ClientId,
    /// Preempted earlier: it was admitted (and charged) before, and goes back in first.
    pub resumed: bool,
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
pub fn plan(state: &SchedState, budgets: &Budgets, fair: &FairShare) -> StepPlan {
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

    // Admission: resumed sequences first, then new ones in fair order; stop at the first that
    // does not fit so nobody is overtaken forever.
    let mut running = alive.len();
    // Keep a block per running sequence in reserve so admitting does not force an immediate
    // preemption on the next decode step.
    let reserve = running.min(budgets.free_blocks / 8);
    for seq in admission_order(&state.waiting, fair) {
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

/// The order in which waiting sequences would be admitted: resumed ones as queued, then new ones
/// by virtual token counter at two levels: the tenant with the smallest counter, then its account
/// with the smallest counter, gives its oldest sequence. Counters are projected with the cost of
/// the admissions chosen before; ties go to whoever's oldest sequence came first.
pub fn admission_order(waiting: &[SeqSched], fair: &FairShare) -> Vec<SeqSched> {
    /// One account's new sequences, oldest first, and its projected counter.
    struct Account {
        counter: u64,
        seqs: VecDeque<SeqSched>,
    }
    /// One tenant's accounts, in order of their oldest sequence, and its projected counter.
    struct Tenant {
        counter: u64,
        accounts: Vec<Account>,
    }
    let mut order: Vec<SeqSched> = waiting.iter().filter(|s| s.resumed).copied().collect();
    let mut tenants: Vec<Tenant> = Vec::new();
    let mut tenant_slot: HashMap<u64, usize> = HashMap::new();
    let mut account_slot: HashMap<ClientId, usize> = HashMap::new();
    for seq in waiting.iter().filter(|s| !s.resumed) {
        let t = *tenant_slot.entry(seq.client.tenant).or_insert_with(|| {
            tenants.push(Tenant { counter: fair.tenant_counter(seq.client.tenant), accounts: Vec::new() });
            tenants.len() - 1
        });
        let accounts = &mut tenants[t].accounts;
        let a = *account_slot.entry(seq.client).or_insert_with(|| {
            accounts.push(Account { counter: fair.counter(seq.client), seqs: VecDeque::new() });
            accounts.len() - 1
        });
        accounts[a].seqs.push_back(*seq);
    }
    let has_work = |t: &Tenant| t.accounts.iter().any(|a| !a.seqs.is_empty());
    while let Some(t) =
        (0..tenants.len()).filter(|&t| has_work(&tenants[t])).min_by_key(|&t| (tenants[t].counter, t))
    {
        let tenant = &mut tenants[t];
        let Some(a) = (0..tenant.accounts.len())
            .filter(|&a| !tenant.accounts[a].seqs.is_empty())
            .min_by_key(|&a| (tenant.accounts[a].counter, a))
        else {
            break;
        };
        let account = &mut tenant.accounts[a];
        let Some(seq) = account.seqs.pop_front() else { break };
        let cost = admission_cost(seq.len);
        account.counter += cost;
        tenant.counter += cost;
        order.push(seq);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(id: SeqId, len: usize, computed: usize, bs: usize) -> SeqSched {
        SeqSched {
            id,
            len,
            computed,
            blocks: blocks_for(computed, bs),
            client: ClientId::default(),
            resumed: false,
        }
    }

    fn budgets(tokens: usize, free: usize) -> Budgets {
        Budgets { max_step_tokens: tokens, max_running: 64, block_size: 4, free_blocks: free }
    }

    #[test]
    fn decode_rows_come_before_prefill_chunks() {
        let state = SchedState { running: vec![seq(1, 100, 10, 4), seq(2, 9, 8, 4)], waiting: vec![] };
        let p = plan(&state, &budgets(16, 100), &FairShare::default());
        assert_eq!(p.rows[0], PlannedRows { id: 2, count: 1, new_blocks: 1 });
        assert_eq!(p.rows[1].id, 1);
        assert_eq!(p.rows[1].count, 15, "prefill takes what is left of the token budget");
        assert_eq!(p.total_rows(), 16);
    }

    #[test]
    fn long_prompt_is_chunked_and_does_not_block_admission_of_short_decodes() {
        let state = SchedState { running: vec![seq(1, 5, 4, 4)], waiting: vec![seq(2, 1000, 0, 4)] };
        let p = plan(&state, &budgets(64, 1000), &FairShare::default());
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
        let p = plan(&state, &b, &FairShare::default());
        assert_eq!(p.admit, vec![1, 2]);
        assert_eq!(p.total_rows(), 20);
        // Not enough blocks for the second: admission stops there.
        let p = plan(&state, &budgets(100, 4), &FairShare::default());
        assert_eq!(p.admit, vec![1]);
    }

    #[test]
    fn out_of_blocks_preempts_the_newest() {
        // Three decoding sequences, each at a block boundary, no free blocks.
        let state =
            SchedState { running: vec![seq(1, 9, 8, 4), seq(2, 9, 8, 4), seq(3, 9, 8, 4)], waiting: vec![] };
        let p = plan(&state, &budgets(16, 0), &FairShare::default());
        assert_eq!(p.preempt, vec![3], "the newest is preempted first");
        assert_eq!(p.rows.iter().map(|r| r.id).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(p.rows.iter().map(|r| r.new_blocks).sum::<usize>(), 2);
    }

    #[test]
    fn a_lone_sequence_that_cannot_grow_is_not_scheduled() {
        let state = SchedState { running: vec![seq(1, 9, 8, 4)], waiting: vec![] };
        let p = plan(&state, &budgets(16, 0), &FairShare::default());
        assert_eq!(p.preempt, vec![1]);
        assert!(p.rows.is_empty());
    }

    #[test]
    fn zero_budget_plans_nothing() {
        let state = SchedState { running: vec![seq(1, 9, 8, 4)], waiting: vec![seq(2, 3, 0, 4)] };
        let p = plan(&state, &budgets(0, 10), &FairShare::default());
        assert_eq!(p, StepPlan::default());
    }

    /// A toy engine around `plan`, charging the counters as the engine core does: whole prompts
    /// prefill in one step, then one token per step until the request's `max_tokens`.
    struct Sim {
        fair: FairShare,
        budgets: Budgets,
        running: Vec<(SeqSched, usize)>,
        waiting: Vec<SeqSched>,
        max_tokens: HashMap<SeqId, usize>,
        arrived_at: HashMap<SeqId, usize>,
        /// (client, steps waited) per admission.
        waits: Vec<(ClientId, usize)>,
        next_id: SeqId,
        step: usize,
    }

    impl Sim {
        fn new(max_running: usize) -> Self {
            let budgets =
                Budgets { max_step_tokens: 4096, max_running, block_size: 16, free_blocks: 1 << 20 };
            Self {
                fair: FairShare::default(),
                budgets,
                running: vec![],
                waiting: vec![],
                max_tokens: HashMap::new(),
                arrived_at: HashMap::new(),
                waits: vec![],
                next_id: 1,
                step: 0,
            }
        }

        fn submit(&mut self, client: ClientId, prompt: usize, max_tokens: usize) -> SeqId {
            let id = self.next_id;
            self.next_id += 1;
            self.fair.arrive(client, self.waiting.iter().map(|s| s.client));
            self.waiting.push(SeqSched { id, len: prompt, computed: 0, blocks: 0, client, resumed: false });
            self.max_tokens.insert(id, max_tokens);
            self.arrived_at.insert(id, self.step);
            id
        }

        fn step(&mut self) {
            let state = SchedState {
                running: self.running.iter().map(|(s, _)| *s).collect(),
                waiting: self.waiting.clone(),
            };
            let p = plan(&state, &self.budgets, &self.fair);
            assert!(p.preempt.is_empty());
            for id in &p.admit {
                let pos = self.waiting.iter().position(|s| s.id == *id).expect("admitted from waiting");
                let seq = self.waiting.remove(pos);
                self.fair.admitted(seq.client, seq.len);
                self.waits.push((seq.client, self.step - self.arrived_at[id]));
                self.running.push((seq, 0));
            }
            for r in &p.rows {
                let (seq, generated) = self.running.iter_mut().find(|(s, _)| s.id == r.id).expect("row");
                seq.computed += r.count;
                if seq.computed == seq.len {
                    seq.len += 1;
                    *generated += 1;
                    self.fair.generated(seq.client);
                }
            }
            let max_tokens = &self.max_tokens;
            self.running.retain(|(s, generated)| *generated < max_tokens[&s.id]);
            self.step += 1;
        }

        fn queued(&self, client: ClientId) -> bool {
            self.waiting.iter().any(|s| s.client == client)
        }
    }

    #[test]
    fn backlogged_clients_stay_within_the_virtual_token_bound() {
        // (client, prompt, max_tokens): long prompts, long outputs, and small requests.
        use super::super::fair::{DECODE_WEIGHT, PREFILL_WEIGHT};
        let shapes =
            [(ClientId::new(1, 0), 200, 4), (ClientId::new(2, 0), 8, 60), (ClientId::new(3, 0), 20, 20)];
        let slots = 4;
        let longest_prompt = shapes.iter().map(|s| s.1).max().unwrap_or(0) as u64;
        let longest_output = shapes.iter().map(|s| s.2).max().unwrap_or(0) as u64;
        // VTC's U: one admission plus everything the running batch can still generate.
        let max_cost = PREFILL_WEIGHT * longest_prompt + DECODE_WEIGHT * slots as u64 * longest_output;
        let mut sim = Sim::new(slots);
        // Each client's requests queued as one block: arrival order alone (FIFO) would serve
        // client 1 until its block is done.
        for &(c, p, m) in &shapes {
            for _ in 0..40 {
                sim.submit(c, p, m);
            }
        }
        let mut checked = 0;
        while shapes.iter().all(|&(c, _, _)| sim.queued(c)) {
            let counters: Vec<u64> =
                shapes.iter().map(|&(c, _, _)| sim.fair.tenant_counter(c.tenant)).collect();
            let spread = counters.iter().max().unwrap_or(&0) - counters.iter().min().unwrap_or(&0);
            assert!(
                spread <= 2 * max_cost,
                "step {}: counters {counters:?} spread beyond 2 x {max_cost}",
                sim.step
            );
            sim.step();
            checked += 1;
        }
        assert!(checked > 100, "the clients stayed backlogged for {checked} steps");
        // Each client got admissions in proportion: nobody was starved while backlogged.
        for &(c, _, _) in &shapes {
            assert!(
                sim.waits.iter().filter(|(w, _)| *w == c).count() >= 5,
                "client {c:?} admitted too rarely"
            );
        }
    }

    #[test]
    fn a_late_client_is_admitted_within_a_bounded_number_of_steps_despite_a_flood() {
        let (prompt, max_tokens, slots) = (16, 10, 4);
        let mut sim = Sim::new(slots);
        for _ in 0..200 {
            sim.submit(ClientId::new(1, 0), prompt, max_tokens);
        }
        for _ in 0..50 {
            sim.step();
        }
        let late = ClientId::new(2, 0);
        sim.submit(late, prompt, max_tokens);
        while sim.queued(late) {
            sim.step();
        }
        let (_, waited) = *sim.waits.iter().find(|(c, _)| *c == late).expect("client 2 admitted");
        // A slot frees at least every max_tokens + 1 steps; the late client needs at most two
        // admissions (a tie with the flooder goes to the flooder's older request first).
        assert!(waited <= 2 * (max_tokens + 1), "waited {waited} steps");
        assert!(
            sim.waiting.len() > 100,
            "the flood is still queued: FIFO would have made client 2 wait for it"
        );
    }

    #[test]
    fn resumed_sequences_go_first_and_a_big_request_is_not_overtaken() {
        let mk = |id, len, tenant, resumed| SeqSched {
            id,
            len,
            computed: 0,
            blocks: 0,
            client: ClientId::new(tenant, 0),
            resumed,
        };
        let mut fair = FairShare::default();
        fair.admitted(ClientId::new(1, 0), 1000);
        let waiting = vec![mk(1, 10, 1, false), mk(2, 10, 2, false), mk(3, 10, 1, true)];
        let order: Vec<SeqId> = admission_order(&waiting, &fair).iter().map(|s| s.id).collect();
        assert_eq!(order, vec![3, 2, 1], "resumed first, then the client with less service");
        // The fair choice does not fit: nothing behind it is admitted in its place.
        let state = SchedState { running: vec![], waiting: vec![mk(1, 4, 1, false), mk(2, 400, 2, false)] };
        let mut fair = FairShare::default();
        fair.admitted(ClientId::new(1, 0), 1000);
        let p = plan(
            &state,
            &Budgets { max_step_tokens: 512, max_running: 8, block_size: 4, free_blocks: 20 },
            &fair,
        );
        assert!(p.admit.is_empty(), "{p:?}");
    }

    #[test]
    fn a_tenant_gets_no_larger_share_by_spreading_over_more_adapters() {
        let mut sim = Sim::new(4);
        // Tenant 1 spreads its requests over eight adapters; tenant 2 uses one.
        for i in 0..240u64 {
            sim.submit(ClientId::new(1, i % 8), 16, 8);
        }
        for _ in 0..240 {
            sim.submit(ClientId::new(2, 0), 16, 8);
        }
        while sim.queued(ClientId::new(2, 0)) && sim.waiting.iter().any(|s| s.client.tenant == 1) {
            sim.step();
        }
        let admitted = |tenant| sim.waits.iter().filter(|(c, _)| c.tenant == tenant).count();
        let (one, two) = (admitted(1), admitted(2));
        assert!(
            one.abs_diff(two) <= 2,
            "tenant 1 (8 adapters) got {one} admissions, tenant 2 (1 adapter) {two}"
        );
        // Within tenant 1, its adapters share equally too.
        let per_adapter: Vec<usize> =
            (0..8).map(|a| sim.waits.iter().filter(|(c, _)| *c == ClientId::new(1, a)).count()).collect();
        let (lo, hi) =
            (per_adapter.iter().min().copied().unwrap_or(0), per_adapter.iter().max().copied().unwrap_or(0));
        assert!(hi - lo <= 1, "{per_adapter:?}");
    }
}
