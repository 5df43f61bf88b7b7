//! Engine behaviour on tiny random models: continuous batching gives each request exactly the
//! tokens it gets alone; cancellation frees KV blocks; a KV cache too small for everyone at once
//! still finishes every request with the same tokens (preemption and recompute).

mod common;

use common::*;
use lorahost::engine::{ClientId, EngineCore, EngineError, TokenEvent, ValidRequest};
use lorahost::model::KvCache;
use lorahost::testing::TinyModel;

fn workload() -> Vec<ValidRequest> {
    let prompt = |n: usize, salt: u32| {
        (0..n as u32).map(|i| (i * 7919 + salt * 104_729) % 49_000 + 3).collect::<Vec<_>>()
    };
    vec![
        request(prompt(5, 1), 12, greedy()),
        request(prompt(37, 2), 20, seeded(7)),
        request(prompt(1, 3), 9, greedy()),
        request(prompt(70, 4), 15, seeded(11)),
        request(prompt(16, 5), 17, greedy()),
        request(prompt(3, 6), 25, seeded(5)),
    ]
}

fn alone(base: &lorahost::base::Base, req: &ValidRequest) -> Vec<u32> {
    let mut core =
        EngineCore::new(base.model.clone(), base.tokenizer.clone(), engine_config(64 << 20, 16, 512));
    let mut rx = submit(&mut core, req.clone());
    run_to_end(&mut core);
    drain_tokens(&mut rx)
}

#[test]
fn continuous_batching_matches_each_request_alone() {
    let (_dir, base) = tiny_base(TinyModel::default());
    let reqs = workload();
    let expected: Vec<Vec<u32>> = reqs.iter().map(|r| alone(&base, r)).collect();
    for (r, e) in reqs.iter().zip(&expected) {
        assert_eq!(e.len(), r.stop.max_tokens);
    }
    // Small step budget so prefills are chunked and mixed with decodes; requests arrive while
    // others are running.
    let mut core =
        EngineCore::new(base.model.clone(), base.tokenizer.clone(), engine_config(64 << 20, 4, 24));
    let mut streams = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        streams.push(submit(&mut core, r.clone()));
        for _ in 0..i {
            core.step().expect("step");
        }
    }
    run_to_end(&mut core);
    for (i, rx) in streams.iter_mut().enumerate() {
        assert_eq!(drain_tokens(rx), expected[i], "request {i}");
    }
    let stats = core.stats();
    assert_eq!(stats.free_blocks, stats.total_blocks, "every block returned");
}

#[test]
fn too_small_kv_cache_preempts_and_still_finishes_identically() {
    let shape = TinyModel::default();
    let (_dir, base) = tiny_base(shape);
    let reqs = workload();
    let expected: Vec<Vec<u32>> = reqs.iter().map(|r| alone(&base, r)).collect();
    // Room for 96 tokens: the largest request (70 + 15) fits alone, not all of them together.
    let block_bytes = KvCache::block_bytes(base.model.config(), 4);
    let mut core =
        EngineCore::new(base.model.clone(), base.tokenizer.clone(), engine_config(24 * block_bytes, 4, 32));
    let mut streams: Vec<_> = reqs.iter().map(|r| submit(&mut core, r.clone())).collect();
    run_to_end(&mut core);
    assert!(core.stats().preemptions > 0, "the budget must force preemption");
    for (i, rx) in streams.iter_mut().enumerate() {
        assert_eq!(drain_tokens(rx), expected[i], "request {i}");
    }
    let stats = core.stats();
    assert_eq!(stats.free_blocks, stats.total_blocks);
}

#[test]
fn cancellation_frees_blocks_at_the_next_step() {
    let (_dir, base) = tiny_base(TinyModel::default());
    let mut core =
        EngineCore::new(base.model.clone(), base.tokenizer.clone(), engine_config(64 << 20, 4, 512));
    let total = core.stats().total_blocks;
    let keep = submit(&mut core, request(vec![5; 40], 50, greedy()));
    let dropped = submit(&mut core, request(vec![6; 40], 50, greedy()));
    for _ in 0..3 {
        core.step().expect("step");
    }
    let held = total - core.stats().free_blocks;
    assert!(held >= 2 * 11, "both sequences hold blocks ({held})");
    drop(dropped);
    core.step().expect("step");
    let held_after = total - core.stats().free_blocks;
    assert!(held_after <= 12, "the cancelled sequence's blocks are free ({held_after} held)");
    assert_eq!(core.stats().running, 1);
    drop(keep);
    core.step().expect("step");
    assert!(!core.has_work());
    assert_eq!(core.stats().free_blocks, total);
}

#[test]
fn finished_stream_reports_counts_and_reason() {
    let (_dir, base) = tiny_base(TinyModel::default());
    let mut core =
        EngineCore::new(base.model.clone(), base.tokenizer.clone(), engine_config(64 << 20, 16, 512));
    let mut rx = submit(&mut core, request(vec![10, 11, 12], 4, greedy()));
    run_to_end(&mut core);
    let events: Vec<TokenEvent> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
    assert_eq!(events.len(), 5);
    match events.last() {
        Some(TokenEvent::Finished(c)) => {
            assert_eq!((c.prompt_tokens, c.completion_tokens), (3, 4));
            assert_eq!(c.reason.as_openai(), "length");
        }
        other => panic!("expected Finished, got {other:?}"),
    }
}

#[test]
fn requests_that_cannot_fit_are_rejected_without_side_effects() {
    let (_dir, base) = tiny_base(TinyModel { max_positions: 64, ..Default::default() });
    let mut core =
        EngineCore::new(base.model.clone(), base.tokenizer.clone(), engine_config(64 << 20, 16, 512));
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let err = core.add(request(vec![5; 60], 10, greedy()), tx.clone()).unwrap_err();
    assert!(matches!(err, EngineError::PromptTooLong { prompt_tokens: 60, .. }), "{err}");
    // A max_tokens so large that prompt + max_tokens wraps around in usize.
    let err = core.add(request(vec![5; 3], usize::MAX - 1, greedy()), tx.clone()).unwrap_err();
    assert!(matches!(err, EngineError::PromptTooLong { prompt_tokens: 3, .. }), "{err}");
    assert!(matches!(
        core.add(request(vec![], 10, greedy()), tx.clone()),
        Err(EngineError::InvalidRequest(_))
    ));
    assert!(matches!(core.add(request(vec![60_000], 10, greedy()), tx), Err(EngineError::InvalidRequest(_))));
    assert!(!core.has_work());
}

fn tiny_adapter(
    shape: TinyModel,
    base: &lorahost::base::Base,
    rank: usize,
    targets: &[&str],
    seed: u64,
) -> std::sync::Arc<adapters::LoraAdapter> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("adapter");
    shape.write_adapter(&path, rank, 2.0 * rank as f64, targets, seed).expect("write adapter");
    std::sync::Arc::new(
        adapters::LoraAdapter::load_dir(&path, &base.model.base_shape()).expect("load adapter"),
    )
}

#[test]
fn mixed_adapter_batches_match_each_request_alone() {
    let shape = TinyModel::default();
    let (_dir, base) = tiny_base(shape);
    let all = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    let adapters = [
        tiny_adapter(shape, &base, 4, &["q_proj", "v_proj"], 11),
        tiny_adapter(shape, &base, 16, &all, 12),
        tiny_adapter(shape, &base, 1, &["down_proj"], 13),
    ];
    let mut reqs = workload();
    for (i, r) in reqs.iter_mut().enumerate() {
        // Base, a, b, c, a, b: several sequences share an adapter, one runs on the base.
        r.adapter = if i == 0 { None } else { Some(adapters[(i - 1) % adapters.len()].clone().into()) };
    }
    let expected: Vec<Vec<u32>> = reqs.iter().map(|r| alone(&base, r)).collect();
    let base_only: Vec<Vec<u32>> =
        reqs.iter().map(|r| alone(&base, &ValidRequest { adapter: None, ..r.clone() })).collect();
    assert!(expected.iter().zip(&base_only).skip(1).all(|(a, b)| a != b), "each adapter changes the output");
    let mut core =
        EngineCore::new(base.model.clone(), base.tokenizer.clone(), engine_config(64 << 20, 4, 24));
    let mut streams = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        streams.push(submit(&mut core, r.clone()));
        if i % 2 == 1 {
            core.step().expect("step");
        }
    }
    run_to_end(&mut core);
    for (i, rx) in streams.iter_mut().enumerate() {
        assert_eq!(drain_tokens(rx), expected[i], "request {i}");
    }
}

fn slow_cache(
    adapter: std::sync::Arc<adapters::LoraAdapter>,
    delay: std::time::Duration,
) -> adapters::cache::HostCache<adapters::LoraAdapter> {
    let known = adapter.id;
    let loader: adapters::cache::Loader<adapters::LoraAdapter> = std::sync::Arc::new(move |id| {
        std::thread::sleep(delay);
        if id == known {
            Ok((*adapter).clone())
        } else {
            Err("no such adapter".into())
        }
    });
    adapters::cache::HostCache::new(adapters::cache::CacheConfig::default(), loader).expect("cache")
}

#[test]
fn a_cold_adapter_waits_in_the_queue_not_in_the_batch() {
    use lorahost::engine::AdapterChoice;
    let shape = TinyModel::default();
    let (_dir, base) = tiny_base(shape);
    let adapter = tiny_adapter(shape, &base, 8, &["q_proj", "v_proj", "down_proj"], 21);
    let with_adapter = request(vec![9, 8, 7, 6], 12, greedy());
    let expected =
        alone(&base, &ValidRequest { adapter: Some(adapter.clone().into()), ..with_adapter.clone() });
    let cache = slow_cache(adapter.clone(), std::time::Duration::from_millis(300));
    let mut core =
        EngineCore::new(base.model.clone(), base.tokenizer.clone(), engine_config(64 << 20, 16, 512))
            .with_adapter_cache(cache.clone());
    let mut cold =
        submit(&mut core, ValidRequest { adapter: Some(AdapterChoice::Cached(adapter.id)), ..with_adapter });
    let mut warm = submit(&mut core, request(vec![1, 2, 3], 5, greedy()));
    let mut bad = submit(
        &mut core,
        ValidRequest {
            adapter: Some(AdapterChoice::Cached(adapters::AdapterId::of_files(b"x", b"y"))),
            ..request(vec![4], 3, greedy())
        },
    );
    // The base request runs to completion while the adapter is still loading.
    for _ in 0..5 {
        core.step().expect("step");
    }
    assert_eq!(drain_tokens(&mut warm).len(), 5, "base rows were not held up by the cold adapter");
    assert_eq!(core.stats().waiting, 2, "the cold requests wait in the queue");
    run_to_end(&mut core);
    assert_eq!(drain_tokens(&mut cold), expected, "same tokens as with the adapter loaded up front");
    match std::iter::from_fn(|| bad.try_recv().ok()).last() {
        Some(TokenEvent::Failed(msg)) => assert!(msg.contains("no such adapter"), "{msg}"),
        other => panic!("expected a failure, got {other:?}"),
    }
    let stats = cache.stats();
    assert_eq!((stats.loads, stats.pinned), (1, 0), "loaded once, unpinned when the sequence ended");
}

#[test]
fn the_queue_pins_no_more_adapter_memory_than_the_cache_budget() {
    use adapters::cache::{CacheConfig, HostCache, Loader};
    use lorahost::engine::AdapterChoice;
    use lorahost::engine::EngineConfig;
    use std::collections::HashMap;
    let shape = TinyModel::default();
    let (_dir, base) = tiny_base(shape);
    let adapters: Vec<_> =
        (0..8).map(|i| tiny_adapter(shape, &base, 4, &["q_proj", "v_proj"], 40 + i)).collect();
    let bytes = adapters[0].bytes();
    assert!(adapters.iter().all(|a| a.bytes() == bytes));
    let by_id: HashMap<_, _> = adapters.iter().map(|a| (a.id, a.clone())).collect();
    let loader: Loader<adapters::LoraAdapter> =
        std::sync::Arc::new(move |id| by_id.get(&id).map(|a| (**a).clone()).ok_or_else(|| "unknown".into()));
    // Room for two adapters; one request runs at a time, the other seven wait in the queue.
    let budget = 2 * bytes;
    let cache = HostCache::new(CacheConfig { budget_bytes: budget, ..CacheConfig::default() }, loader)
        .expect("cache");
    let config = EngineConfig { max_running: 1, ..engine_config(64 << 20, 16, 512) };
    let mut core =
        EngineCore::new(base.model.clone(), base.tokenizer.clone(), config).with_adapter_cache(cache.clone());
    let reqs: Vec<ValidRequest> = adapters
        .iter()
        .enumerate()
        .map(|(i, a)| ValidRequest {
            adapter: Some(AdapterChoice::Cached(a.id)),
            ..request(vec![3 + i as u32, 5, 7], 6, greedy())
        })
        .collect();
    let mut streams: Vec<_> = reqs.iter().map(|r| submit(&mut core, r.clone())).collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut most_pinned = 0;
    while core.has_work() {
        if !core.step().expect("step") {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        most_pinned = most_pinned.max(cache.pinned_bytes());
        assert!(std::time::Instant::now() < deadline, "engine does not terminate");
    }
    // A lease is taken only while the pins are under budget, so they pass it by one adapter at most.
    assert!(most_pinned <= budget + bytes, "the queue pinned {most_pinned} bytes, budget {budget}");
    assert!(most_pinned >= bytes, "requests ran on leased adapters");
    for (i, (rx, r)) in streams.iter_mut().zip(&reqs).enumerate() {
        let loaded = ValidRequest { adapter: Some(adapters[i].clone().into()), ..r.clone() };
        assert_eq!(drain_tokens(rx), alone(&base, &loaded), "request {i}");
    }
    assert_eq!(cache.pinned_bytes(), 0);
}

#[test]
fn an_adapter_that_overflows_fails_its_request_alone() {
    let shape = TinyModel::default();
    let (_dir, base) = tiny_base(shape);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("huge");
    // Finite, so it loads, but alpha / r = 2.5e37 overflows the activations on the way.
    let all = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    shape.write_adapter(&path, 4, 1e38, &all, 5).expect("write adapter");
    let huge =
        std::sync::Arc::new(adapters::LoraAdapter::load_dir(&path, &base.model.base_shape()).expect("load"));
    let mut core =
        EngineCore::new(base.model.clone(), base.tokenizer.clone(), engine_config(64 << 20, 16, 512));
    let plain = request(vec![10, 11, 12], 4, greedy());
    let expected = alone(&base, &plain);
    let mut ok = submit(&mut core, plain);
    let mut bad = submit(
        &mut core,
        ValidRequest { adapter: Some(huge.into()), ..request(vec![10, 11, 12], 4, greedy()) },
    );
    run_to_end(&mut core);
    assert_eq!(drain_tokens(&mut ok), expected, "the base row of the same steps is unaffected");
    match std::iter::from_fn(|| bad.try_recv().ok()).last() {
        Some(TokenEvent::Failed(msg)) => assert!(msg.contains("non-finite logits"), "{msg}"),
        other => panic!("expected a failure, got {other:?}"),
    }
    assert!(!core.has_work());
}

#[test]
fn a_late_client_is_not_starved_by_a_flood_from_another() {
    let (_dir, base) = tiny_base(TinyModel::default());
    let mut config = engine_config(64 << 20, 16, 512);
    config.max_running = 1;
    let mut core = EngineCore::new(base.model.clone(), base.tokenizer.clone(), config);
    let (flooder, late) = (ClientId::new(1, 0), ClientId::new(2, 0));
    let (tx, mut flood_events) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..20u32 {
        core.add_for(request(vec![3 + i; 8], 4, greedy()), tx.clone(), flooder).expect("queued");
    }
    core.step().expect("step");
    let (late_tx, mut late_events) = tokio::sync::mpsc::unbounded_channel();
    core.add_for(request(vec![5; 8], 4, greedy()), late_tx, late).expect("queued");
    // Arrival order would run the 19 queued flood requests first; fair admission runs the late
    // client's request after at most one more flood request.
    let mut flood_finished = 0;
    loop {
        core.step().expect("step");
        while let Ok(ev) = flood_events.try_recv() {
            flood_finished += usize::from(matches!(ev, TokenEvent::Finished(_)));
        }
        let mut late_finished = false;
        while let Ok(ev) = late_events.try_recv() {
            late_finished |= matches!(ev, TokenEvent::Finished(_));
        }
        if late_finished {
            break;
        }
        assert!(core.has_work(), "the late request never finished");
    }
    assert!(flood_finished <= 2, "{flood_finished} flood requests ran before the late one");
    assert_eq!(core.stats().queued, 20 - flood_finished, "the rest of the flood is still queued");
}

#[test]
fn the_queue_of_new_requests_is_bounded_and_recovers() {
    let (_dir, base) = tiny_base(TinyModel::default());
    let mut config = engine_config(64 << 20, 16, 512);
    config.max_running = 1;
    let engine = lorahost::engine::Engine::start(base.model.clone(), base.tokenizer.clone(), config, None)
        .expect("engine")
        .with_max_waiting(2);
    // One running and two waiting fit; a fourth request cannot, whatever the engine thread has
    // admitted meanwhile.
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..4u32 {
        match engine.submit(request(vec![3 + i; 8], 2000, greedy())) {
            Ok(rx) => accepted.push(rx),
            Err(EngineError::Overloaded { limit: 2, .. }) => refused += 1,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert!(refused >= 1 && accepted.len() <= 3, "{} accepted, {refused} refused", accepted.len());
    // The callers go away: their sequences are cancelled and the queue empties.
    drop(accepted);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let stats = engine.stats();
        if stats.queued == 0 && stats.running == 0 && stats.free_blocks == stats.total_blocks {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not drained: {stats:?}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let mut rx = engine.submit(request(vec![5; 8], 3, greedy())).expect("accepted again");
    let mut tokens = 0;
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            TokenEvent::Token(_) => tokens += 1,
            TokenEvent::Finished(_) => break,
            TokenEvent::Failed(e) => panic!("{e}"),
        }
    }
    assert_eq!(tokens, 3);
}
