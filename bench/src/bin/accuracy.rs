//! What `--dtype auto` costs in accuracy: the default model's logits and greedy tokens under
//! `auto` (quantized weights, 8-bit activations in the kernels) against `f32` (dequantized
//! weights, the transformers-exact mode), over the golden prompts and a few more.
//!
//! `cargo run --release -p lorahost-bench --bin accuracy`

use lorahost::base::Base;
use lorahost::chat::ChatMessage;
use lorahost::engine::{
    argmax, EngineConfig, EngineCore, SamplingParams, StopCriteria, TokenEvent, ValidRequest,
};
use lorahost::model::Dtype;
use tokio::sync::mpsc::unbounded_channel;

const GEN: usize = 32;

fn greedy(base: &Base, prompt: &[u32]) -> anyhow::Result<Vec<u32>> {
    let mut core = EngineCore::new(base.model.clone(), base.tokenizer.clone(), EngineConfig::default());
    let (tx, mut rx) = unbounded_channel();
    let req = ValidRequest {
        prompt_ids: prompt.to_vec(),
        sampling: SamplingParams { temperature: 0.0, ..Default::default() },
        stop: StopCriteria { max_tokens: GEN, stop: vec![], ignore_eos: true },
        adapter: None,
    };
    core.add(req, tx)?;
    while core.has_work() {
        core.step()?;
    }
    Ok(std::iter::from_fn(|| rx.try_recv().ok())
        .filter_map(|e| if let TokenEvent::Token(t) = e { Some(t.id) } else { None })
        .collect())
}

fn main() -> anyhow::Result<()> {
    let path = lorahost::fetch::default_model()?;
    let exact = Base::load(&path, Dtype::F32)?;
    let auto = Base::load(&path, Dtype::Auto)?;
    let raw = [
        "The capital of France is",
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
        "Once upon a time, in a small village by the sea,",
        "The three primary colors are",
        "import numpy as np\n\nx = np.",
    ];
    let chats = [
        "What is the capital of France?",
        "Write a short poem about autumn leaves.",
        "Give me three tips for learning Rust.",
        "What is 17 + 25?",
    ];
    let mut prompts: Vec<(String, Vec<u32>)> = Vec::new();
    for p in raw {
        prompts.push((format!("raw: {p:?}"), exact.tokenizer.encode(p)?));
    }
    for c in chats {
        let ids = exact.chat_prompt(&[ChatMessage { role: "user".into(), content: c.into() }])?;
        prompts.push((format!("chat: {c:?}"), ids));
    }
    println!("| prompt | max abs Δlogit | top-1 same | greedy tokens equal before divergence (of {GEN}) |");
    println!("| --- | --- | --- | --- |");
    let mut worst = 0f32;
    let mut same_top1 = 0;
    let mut prefix_sum = 0;
    for (name, ids) in &prompts {
        let (a, b) = (exact.model.last_logits(ids, None)?, auto.model.last_logits(ids, None)?);
        let max_abs = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        worst = worst.max(max_abs);
        let top1 = argmax(&a) == argmax(&b);
        same_top1 += usize::from(top1);
        let (ga, gb) = (greedy(&exact, ids)?, greedy(&auto, ids)?);
        let prefix = ga.iter().zip(&gb).take_while(|(x, y)| x == y).count();
        prefix_sum += prefix;
        println!("| {name} | {max_abs:.3} | {top1} | {prefix} |");
    }
    let n = prompts.len();
    println!(
        "\nworst max |Δlogit| {worst:.3}; top-1 agreement {same_top1}/{n}; mean greedy prefix {:.1}/{GEN}",
        prefix_sum as f64 / n as f64
    );
    Ok(())
}
