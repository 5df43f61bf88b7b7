//! Fair admission across clients (a client is whatever the caller groups requests by: the
//! server uses tenant + adapter): S-LoRA's virtual token counter (VTC, Sheng et al., "Fairness in
//! Serving Large Language Models", OSDI 2024).
//!
//! Every client has a counter of the service it received, in weighted tokens: each prompt token
//! admitted costs [`PREFILL_WEIGHT`], each generated token [`DECODE_WEIGHT`]. Admission picks the
//! waiting client with the smallest counter (its oldest request first). A client that arrives
//! with nothing queued is lifted to the smallest counter among the clients that are queued (or,
//! when none is, to the counter of the client admitted last), so idling never banks credit that
//! could later starve the others.
//!
//! Consequence (the VTC bound): while two clients are both backlogged, their counters differ by
//! at most `2 × U`, with `U = PREFILL_WEIGHT × longest prompt + DECODE_WEIGHT × the tokens the
//! running batch can still generate` (at most `max_running × max_tokens`), whatever the mix of
//! adapters, prompt lengths or arrival rates; and a newly arriving client is picked at the next
//! admission that has room for its request, at the latest after each other queued client got
//! one admission.
//! This module holds only the counters; the choice is made by `plan::plan`.

use std::collections::HashMap;

/// Who a request is accounted to.
pub type ClientId = u64;

/// Weight of one prompt token (prefill is cheap per token: many rows per step).
pub const PREFILL_WEIGHT: u64 = 1;
/// Weight of one generated token (decode is one row per step per sequence, the scarce part).
pub const DECODE_WEIGHT: u64 = 2;

/// The virtual token counters. Pure state: no clock, no I/O.
#[derive(Debug, Clone, Default)]
pub struct FairShare {
    counters: HashMap<ClientId, u64>,
    last_admitted: Option<ClientId>,
}

impl FairShare {
    /// The service `client` has received, in weighted tokens (after lifting).
    pub fn counter(&self, client: ClientId) -> u64 {
        self.counters.get(&client).copied().unwrap_or(0)
    }

    /// A request from `client` arrives; `queued` are the clients with requests already waiting
    /// for admission. A client that had nothing queued is lifted so it cannot claim the service
    /// it did not ask for while it was away.
    pub fn arrive(&mut self, client: ClientId, queued: impl IntoIterator<Item = ClientId>) {
        let mut floor: Option<u64> = None;
        let mut client_queued = false;
        for c in queued {
            if c == client {
                client_queued = true;
                break;
            }
            let v = self.counter(c);
            floor = Some(floor.map_or(v, |f| f.min(v)));
        }
        if client_queued {
            return;
        }
        let floor = floor.or_else(|| self.last_admitted.map(|c| self.counter(c)));
        if let Some(floor) = floor {
            let c = self.counters.entry(client).or_insert(0);
            *c = (*c).max(floor);
        }
    }

    /// A request of `client` with `prompt_tokens` was admitted.
    pub fn admitted(&mut self, client: ClientId, prompt_tokens: usize) {
        *self.counters.entry(client).or_insert(0) += PREFILL_WEIGHT * prompt_tokens as u64;
        self.last_admitted = Some(client);
    }

    /// `client` received one generated token.
    pub fn generated(&mut self, client: ClientId) {
        *self.counters.entry(client).or_insert(0) += DECODE_WEIGHT;
    }

    /// Forgets clients with nothing in the engine whose counter is at or below every other
    /// client's: lifting would restore them to the same place, so this only bounds memory.
    pub fn forget_idle(&mut self, active: impl Fn(ClientId) -> bool) {
        let floor = self.counters.iter().filter(|(c, _)| active(**c)).map(|(_, &v)| v).min();
        let last = self.last_admitted;
        self.counters.retain(|&c, v| active(c) || Some(c) == last || floor.is_some_and(|f| *v > f));
    }

    pub fn clients(&self) -> usize {
        self.counters.len()
    }
}

/// The admission cost the planner projects for a request of `prompt_tokens`.
pub fn admission_cost(prompt_tokens: usize) -> u64 {
    PREFILL_WEIGHT * prompt_tokens as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_arriving_client_is_lifted_to_the_smallest_queued_counter() {
        let mut f = FairShare::default();
        f.admitted(1, 100);
        f.admitted(2, 40);
        f.arrive(3, [1, 2]);
        assert_eq!(f.counter(3), 40, "lifted to the queued minimum");
        f.admitted(3, 10);
        // Already queued: no lift, even if others are ahead.
        f.arrive(3, [3, 1]);
        assert_eq!(f.counter(3), 50);
    }

    #[test]
    fn with_nothing_queued_the_floor_is_the_last_admitted_client() {
        let mut f = FairShare::default();
        f.admitted(1, 30);
        f.generated(1);
        f.arrive(2, []);
        assert_eq!(f.counter(2), 30 + DECODE_WEIGHT);
        // A client ahead of the floor keeps its counter.
        f.admitted(2, 500);
        f.arrive(2, []);
        assert_eq!(f.counter(2), 32 + 500);
    }

    #[test]
    fn forgetting_idle_clients_keeps_the_active_and_the_ahead() {
        let mut f = FairShare::default();
        f.admitted(1, 10);
        f.admitted(2, 50);
        f.admitted(4, 20);
        f.admitted(3, 5);
        f.forget_idle(|c| c == 4);
        assert_eq!(f.counter(2), 50, "ahead of every active client: kept");
        assert_eq!(f.counter(1), 0, "behind the active floor: forgotten");
        assert_eq!(f.counter(3), 5, "the last admitted client is kept");
        assert_eq!(f.clients(), 3);
    }
}
