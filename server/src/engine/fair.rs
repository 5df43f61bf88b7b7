//! Fair admission across tenants, and across the accounts of each tenant (the server uses one
//! account per adapter): S-LoRA's virtual token counter (VTC, Sheng et al., "Fairness in Serving
//! Large Language Models", OSDI 2024), applied at two levels.
//!
//! Every tenant and every account has a counter of the service it received, in weighted tokens:
//! each prompt token admitted costs [`PREFILL_WEIGHT`], each generated token [`DECODE_WEIGHT`].
//! Admission picks the waiting tenant with the smallest counter, then that tenant's waiting
//! account with the smallest counter, then its oldest request. So a tenant cannot claim a larger
//! share by spreading its requests over more adapters, and within a tenant one busy adapter
//! cannot starve the others. A tenant (account) that arrives with nothing queued is lifted to the
//! smallest counter among the queued tenants (that tenant's queued accounts), or, when none is
//! queued, to the counter of the one admitted last, so idling never banks credit that could
//! later starve the others.
//!
//! Consequence (the VTC bound, at each level): while two tenants are both backlogged, their
//! counters differ by at most `2 × U`, with `U = PREFILL_WEIGHT × longest prompt +
//! DECODE_WEIGHT × the tokens the running batch can still generate` (at most `max_running ×
//! max_tokens`), whatever the mix of adapters, prompt lengths or arrival rates; the same holds
//! for two backlogged accounts of one tenant. A newly arriving tenant is picked at the next
//! admission that has room for its request, at the latest after each other queued tenant got
//! one admission. This module holds only the counters; the choice is made by `plan::plan`.

use std::collections::{HashMap, HashSet};

/// Who a request is accounted to: a tenant, and an account within it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId {
    pub tenant: u64,
    pub account: u64,
}

impl ClientId {
    pub fn new(tenant: u64, account: u64) -> Self {
        Self { tenant, account }
    }
}

/// Weight of one prompt token (prefill is cheap per token: many rows per step).
pub const PREFILL_WEIGHT: u64 = 1;
/// Weight of one generated token (decode is one row per step per sequence, the scarce part).
pub const DECODE_WEIGHT: u64 = 2;

/// The virtual token counters. Pure state: no clock, no I/O.
#[derive(Debug, Clone, Default)]
pub struct FairShare {
    tenants: HashMap<u64, u64>,
    accounts: HashMap<ClientId, u64>,
    last_tenant: Option<u64>,
    /// Per tenant, its account admitted last.
    last_account: HashMap<u64, ClientId>,
}

fn lift<K: std::hash::Hash + Eq>(counters: &mut HashMap<K, u64>, key: K, floor: Option<u64>) {
    if let Some(floor) = floor {
        let c = counters.entry(key).or_insert(0);
        *c = (*c).max(floor);
    }
}

impl FairShare {
    /// The service `tenant` has received, in weighted tokens (after lifting).
    pub fn tenant_counter(&self, tenant: u64) -> u64 {
        self.tenants.get(&tenant).copied().unwrap_or(0)
    }

    /// The service the account `client` has received, in weighted tokens (after lifting).
    pub fn counter(&self, client: ClientId) -> u64 {
        self.accounts.get(&client).copied().unwrap_or(0)
    }

    /// A request from `client` arrives; `queued` are the clients with requests already waiting
    /// for admission. A tenant or account that had nothing queued is lifted so it cannot claim
    /// the service it did not ask for while it was away.
    pub fn arrive(&mut self, client: ClientId, queued: impl IntoIterator<Item = ClientId>) {
        let queued: HashSet<ClientId> = queued.into_iter().collect();
        if !queued.iter().any(|q| q.tenant == client.tenant) {
            let floor = queued
                .iter()
                .map(|q| self.tenant_counter(q.tenant))
                .min()
                .or_else(|| self.last_tenant.map(|t| self.tenant_counter(t)));
            lift(&mut self.tenants, client.tenant, floor);
        }
        if !queued.contains(&client) {
            let floor = queued
                .iter()
                .filter(|q| q.tenant == client.tenant)
                .map(|q| self.counter(*q))
                .min()
                .or_else(|| self.last_account.get(&client.tenant).map(|c| self.counter(*c)));
            lift(&mut self.accounts, client, floor);
        }
    }

    /// A request of `client` with `prompt_tokens` was admitted.
    pub fn admitted(&mut self, client: ClientId, prompt_tokens: usize) {
        self.charge(client, admission_cost(prompt_tokens));
        self.last_tenant = Some(client.tenant);
        self.last_account.insert(client.tenant, client);
    }

    /// `client` received one generated token.
    pub fn generated(&mut self, client: ClientId) {
        self.charge(client, DECODE_WEIGHT);
    }

    fn charge(&mut self, client: ClientId, cost: u64) {
        *self.tenants.entry(client.tenant).or_insert(0) += cost;
        *self.accounts.entry(client).or_insert(0) += cost;
    }

    /// Forgets counters nothing in the engine uses, keeping what lifting refers to (the tenant
    /// and accounts admitted last) and tenants ahead of every active one (lifting would not
    /// restore their lead). Only bounds memory: a forgotten counter comes back lifted.
    pub fn forget_idle(&mut self, active: impl Fn(ClientId) -> bool) {
        let active_tenants: HashSet<u64> =
            self.accounts.keys().filter(|c| active(**c)).map(|c| c.tenant).collect();
        let floor = active_tenants.iter().map(|t| self.tenant_counter(*t)).min();
        let last_tenant = self.last_tenant;
        self.tenants.retain(|t, v| {
            active_tenants.contains(t) || Some(*t) == last_tenant || floor.is_some_and(|f| *v > f)
        });
        let tenants = &self.tenants;
        self.last_account.retain(|t, _| tenants.contains_key(t));
        let last_account = &self.last_account;
        self.accounts.retain(|c, _| active(*c) || last_account.get(&c.tenant) == Some(c));
    }

    /// Accounts with a counter.
    pub fn clients(&self) -> usize {
        self.accounts.len()
    }
}

/// The admission cost the planner projects for a request of `prompt_tokens`.
pub fn admission_cost(prompt_tokens: usize) -> u64 {
    PREFILL_WEIGHT * prompt_tokens as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(tenant: u64, account: u64) -> ClientId {
        ClientId::new(tenant, account)
    }

    #[test]
    fn an_arriving_tenant_is_lifted_to_the_smallest_queued_tenant() {
        let mut f = FairShare::default();
        f.admitted(c(1, 0), 100);
        f.admitted(c(2, 0), 40);
        f.arrive(c(3, 0), [c(1, 0), c(2, 0)]);
        assert_eq!(f.tenant_counter(3), 40, "lifted to the queued minimum");
        f.admitted(c(3, 0), 10);
        // Already queued: no lift, even if others are ahead.
        f.arrive(c(3, 0), [c(3, 0), c(1, 0)]);
        assert_eq!(f.tenant_counter(3), 50);
    }

    #[test]
    fn an_arriving_account_is_lifted_within_its_tenant_only() {
        let mut f = FairShare::default();
        f.admitted(c(1, 1), 100);
        f.admitted(c(1, 2), 30);
        f.admitted(c(2, 1), 5);
        f.arrive(c(1, 3), [c(1, 1), c(1, 2), c(2, 1)]);
        assert_eq!(f.counter(c(1, 3)), 30, "the smallest queued account of tenant 1, not tenant 2's");
        assert_eq!(f.tenant_counter(1), 130, "the tenant was queued: unchanged");
    }

    #[test]
    fn with_nothing_queued_the_floor_is_the_last_admitted() {
        let mut f = FairShare::default();
        f.admitted(c(1, 0), 30);
        f.generated(c(1, 0));
        f.arrive(c(2, 0), []);
        assert_eq!(f.tenant_counter(2), 30 + DECODE_WEIGHT);
        f.arrive(c(1, 5), []);
        assert_eq!(f.counter(c(1, 5)), 30 + DECODE_WEIGHT, "lifted to the tenant's last account");
        // A tenant ahead of the floor keeps its counter.
        f.admitted(c(2, 0), 500);
        f.arrive(c(2, 0), []);
        assert_eq!(f.tenant_counter(2), 32 + 500);
    }

    #[test]
    fn forgetting_idle_counters_keeps_the_active_the_last_and_the_ahead() {
        let mut f = FairShare::default();
        f.admitted(c(1, 0), 10);
        f.admitted(c(2, 1), 7);
        f.admitted(c(2, 0), 50);
        f.admitted(c(4, 0), 20);
        f.admitted(c(4, 1), 1);
        f.admitted(c(3, 0), 5);
        f.forget_idle(|x| x == c(4, 0));
        assert_eq!(f.tenant_counter(2), 57, "ahead of every active tenant: kept");
        assert_eq!(f.tenant_counter(1), 0, "behind the active floor: forgotten");
        assert_eq!(f.counter(c(1, 0)), 0, "and its accounts");
        assert_eq!(f.tenant_counter(3), 5, "the last admitted tenant is kept");
        assert_eq!(f.counter(c(4, 0)), 20, "active account kept");
        assert_eq!(f.counter(c(4, 1)), 1, "its tenant's last account kept");
        assert_eq!(f.counter(c(2, 0)), 50, "a kept tenant's last account kept");
        assert_eq!(f.counter(c(2, 1)), 0, "other idle accounts forgotten");
    }
}
