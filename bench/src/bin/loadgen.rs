//! Load generator for a running `lorahost serve`: an S-LoRA style workload. It uploads
//! `--adapters` random rank-`--rank` adapters (for the default model's shapes), then sends
//! `--requests` streaming completions with Poisson arrivals (`--rate` per second), each to an
//! adapter drawn by zipf(`--zipf`) popularity, prompt and output lengths drawn uniformly from
//! `--prompt-len` / `--output-len`. It reports throughput, time to first token and time per
//! output token (p50 / p99), errors, and the server's adapter-cache hit rate and loads per second
//! (from `/metrics`). Plain HTTP/1.1 over std sockets, one thread per request in flight.
//!
//! Start the server yourself, sized as the experiment needs, e.g.
//! `lorahost serve --port 8080 --adapters-dir /tmp/lg --adapter-cache-bytes $((100 * ADAPTER_BYTES))`.

use anyhow::{bail, Context};
use clap::Parser;
use kernels::lora::workload::SplitMix64;
use lorahost::base::Base;
use lorahost::model::Dtype;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
struct Args {
    /// host:port of the server.
    #[arg(long, default_value = "127.0.0.1:8080")]
    server: String,
    #[arg(long)]
    api_key: Option<String>,
    /// Distinct adapters (uploaded as `load-0`, `load-1`, ...; existing ones are replaced).
    #[arg(long, default_value_t = 5)]
    adapters: usize,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Modules the adapters target.
    #[arg(long, default_value = "q_proj,v_proj")]
    targets: String,
    /// Adapt only the first N layers (`layers_to_transform`); default all.
    #[arg(long)]
    layers: Option<usize>,
    /// Skip the upload (the adapters are already on the server).
    #[arg(long)]
    no_upload: bool,
    /// Zipf exponent of adapter popularity.
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Mean arrivals per second.
    #[arg(long, default_value_t = 2.0)]
    rate: f64,
    #[arg(long, default_value_t = 100)]
    requests: usize,
    /// Prompt tokens, uniform in MIN-MAX.
    #[arg(long, default_value = "32-128")]
    prompt_len: String,
    /// Generated tokens, uniform in MIN-MAX.
    #[arg(long, default_value = "16-64")]
    output_len: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn range(s: &str) -> anyhow::Result<(usize, usize)> {
    let (a, b) = s.split_once('-').context("a range is MIN-MAX")?;
    let (a, b) = (a.parse()?, b.parse()?);
    anyhow::ensure!(a >= 1 && a <= b, "bad range {s}");
    Ok((a, b))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (prompt_len, output_len) = (range(&args.prompt_len)?, range(&args.output_len)?);
    let client = Client { addr: args.server.clone(), key: args.api_key.clone() };
    if !args.no_upload {
        upload_adapters(&client, &args)?;
    }
    let before = client.metrics()?;
    let mut rng = SplitMix64::new(args.seed);
    let cdf = zipf_cdf(args.adapters, args.zipf);
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    let mut at = Duration::ZERO;
    let mut threads = Vec::new();
    for i in 0..args.requests {
        at += Duration::from_secs_f64(-(1.0 - rng.next_f64()).ln() / args.rate);
        let adapter = cdf.partition_point(|&c| c < rng.next_f64());
        let prompt: Vec<u32> =
            (0..draw(&mut rng, prompt_len)).map(|_| 100 + rng.below(40_000) as u32).collect();
        let body = json!({
            "model": format!("load-{}", adapter.min(args.adapters - 1)),
            "prompt": prompt,
            "max_tokens": draw(&mut rng, output_len),
            "temperature": 0,
            "ignore_eos": true,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if let Some(wait) = at.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let (client, tx) = (client.clone(), tx.clone());
        threads.push(std::thread::spawn(move || {
            let _ = tx.send((i, client.stream_completion(&body)));
        }));
    }
    drop(tx);
    let results: Vec<(usize, anyhow::Result<Timing>)> = rx.iter().collect();
    for t in threads {
        let _ = t.join();
    }
    let wall = start.elapsed().as_secs_f64();
    let after = client.metrics()?;
    report(&args, &results, wall, &before, &after);
    Ok(())
}

fn draw(rng: &mut SplitMix64, (lo, hi): (usize, usize)) -> usize {
    lo + rng.below(hi - lo + 1)
}

/// Cumulative zipf(α) probabilities over `n` ranks.
fn zipf_cdf(n: usize, alpha: f64) -> Vec<f64> {
    let weights: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(alpha)).collect();
    let total: f64 = weights.iter().sum();
    let mut acc = 0.0;
    weights
        .iter()
        .map(|w| {
            acc += w / total;
            acc
        })
        .collect()
}

fn upload_adapters(client: &Client, args: &Args) -> anyhow::Result<()> {
    let base = Base::load(&lorahost::fetch::default_model()?, Dtype::Auto)?;
    let shape = base.model.base_shape();
    let targets: Vec<&str> = args.targets.split(',').collect();
    let layers = args.layers.unwrap_or(shape.num_layers).min(shape.num_layers);
    let dir = tempfile::tempdir()?;
    let started = Instant::now();
    for i in 0..args.adapters {
        let mut rng = SplitMix64::new(7_000 + i as u64);
        let mut sites = Vec::new();
        for layer in 0..layers {
            for (module, m) in shape.modules.iter().enumerate() {
                if !targets.iter().any(|t| m.path.ends_with(t)) {
                    continue;
                }
                sites.push(adapters::LoraSite {
                    layer,
                    module,
                    rank: args.rank,
                    scale: 1.0,
                    matrices: adapters::SiteMatrices::F32 {
                        a: rng.uniform_vec(args.rank * m.in_features, -0.02, 0.02),
                        b: rng.uniform_vec(m.out_features * args.rank, -0.02, 0.02),
                    },
                    magnitude: None,
                    dora_factor: None,
                });
            }
        }
        let config = json!({
            "peft_type": "LORA", "r": args.rank, "lora_alpha": args.rank, "target_modules": targets,
            "layers_to_transform": (0..layers).collect::<Vec<_>>(),
        });
        let path = dir.path().join(format!("a{i}"));
        adapters::write_adapter_dir(&path, &config, &sites, &shape)?;
        let config = std::fs::read(path.join(adapters::CONFIG_FILE))?;
        let weights = std::fs::read(path.join(adapters::WEIGHTS_FILE))?;
        client.upload(&format!("load-{i}"), &config, &weights)?;
        std::fs::remove_dir_all(&path)?;
        if i == 0 {
            eprintln!("adapter size: {} bytes", config.len() + weights.len());
        }
    }
    eprintln!("uploaded {} adapters in {:.1}s", args.adapters, started.elapsed().as_secs_f64());
    Ok(())
}

/// One request's timings.
#[derive(Debug)]
struct Timing {
    ttft: f64,
    tpot: Option<f64>,
    e2e: f64,
    tokens: usize,
}

fn percentile(xs: &[f64], p: f64) -> f64 {
    let mut xs = xs.to_vec();
    xs.sort_by(f64::total_cmp);
    if xs.is_empty() {
        return f64::NAN;
    }
    xs[((xs.len() - 1) as f64 * p).round() as usize]
}

fn report(
    args: &Args,
    results: &[(usize, anyhow::Result<Timing>)],
    wall: f64,
    before: &HashMap<String, f64>,
    after: &HashMap<String, f64>,
) {
    let ok: Vec<&Timing> = results.iter().filter_map(|(_, r)| r.as_ref().ok()).collect();
    for (i, r) in results {
        if let Err(e) = r {
            eprintln!("request {i}: {e:#}");
        }
    }
    let tokens: usize = ok.iter().map(|t| t.tokens).sum();
    let ttft: Vec<f64> = ok.iter().map(|t| t.ttft).collect();
    let tpot: Vec<f64> = ok.iter().filter_map(|t| t.tpot).collect();
    let e2e: Vec<f64> = ok.iter().map(|t| t.e2e).collect();
    let delta = |name: &str| after.get(name).unwrap_or(&0.0) - before.get(name).unwrap_or(&0.0);
    let (hits, misses) = (
        delta("lorahost_adapter_cache_hits_total{tier=\"host\"}"),
        delta("lorahost_adapter_cache_misses_total{tier=\"host\"}"),
    );
    let loads = delta("lorahost_adapter_cache_loads_total{tier=\"host\"}");
    let summary = json!({
        "adapters": args.adapters, "rank": args.rank, "targets": args.targets, "layers": args.layers,
        "rate": args.rate, "zipf": args.zipf, "requests": args.requests,
        "prompt_len": args.prompt_len, "output_len": args.output_len,
        "ok": ok.len(), "errors": results.len() - ok.len(),
        "wall_s": wall,
        "throughput_tok_s": tokens as f64 / wall,
        "ttft_p50_s": percentile(&ttft, 0.5), "ttft_p99_s": percentile(&ttft, 0.99),
        "tpot_p50_s": percentile(&tpot, 0.5), "tpot_p99_s": percentile(&tpot, 0.99),
        "e2e_max_s": percentile(&e2e, 1.0),
        "cache_hit_rate": if hits + misses > 0.0 { hits / (hits + misses) } else { f64::NAN },
        "cache_loads_per_s": loads / wall,
    });
    println!("{summary}");
}

/// A minimal HTTP/1.1 client (one connection per request).
#[derive(Clone)]
struct Client {
    addr: String,
    key: Option<String>,
}

struct Reply {
    status: u16,
    body: Box<dyn BufRead + Send>,
}

impl Client {
    fn send(&self, method: &str, path: &str, content_type: &str, body: &[u8]) -> anyhow::Result<Reply> {
        let mut stream =
            TcpStream::connect(&self.addr).with_context(|| format!("connecting to {}", self.addr))?;
        stream.set_nodelay(true)?;
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", self.addr);
        if let Some(k) = &self.key {
            head.push_str(&format!("Authorization: Bearer {k}\r\n"));
        }
        if !content_type.is_empty() {
            head.push_str(&format!("Content-Type: {content_type}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let status: u16 = line.split_whitespace().nth(1).context("no status line")?.parse()?;
        let (mut chunked, mut length) = (false, None);
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let lower = header.to_ascii_lowercase();
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            } else if let Some(v) = lower.strip_prefix("content-length:") {
                length = Some(v.trim().parse::<u64>()?);
            }
        }
        let body: Box<dyn BufRead + Send> = if chunked {
            Box::new(BufReader::new(Chunked { inner: reader, left: 0, done: false }))
        } else {
            Box::new(BufReader::new(reader.take(length.unwrap_or(u64::MAX))))
        };
        Ok(Reply { status, body })
    }

    fn json(&self, method: &str, path: &str, content_type: &str, body: &[u8]) -> anyhow::Result<Value> {
        let mut reply = self.send(method, path, content_type, body)?;
        let mut text = String::new();
        reply.body.read_to_string(&mut text)?;
        if !(200..300).contains(&reply.status) {
            bail!("{method} {path}: {} {text}", reply.status);
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    fn upload(&self, name: &str, config: &[u8], weights: &[u8]) -> anyhow::Result<()> {
        // Derived from the content, so the content cannot contain it by accident.
        let boundary = format!("loadgen-{}", adapters::AdapterId::of_files(config, weights).to_hex());
        let mut body = Vec::new();
        for (part, bytes) in [(adapters::CONFIG_FILE, config), (adapters::WEIGHTS_FILE, weights)] {
            body.extend_from_slice(
                format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{part}\"; filename=\"{part}\"\r\n\r\n").as_bytes(),
            );
            body.extend_from_slice(bytes);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        self.json(
            "PUT",
            &format!("/v1/adapters/{name}"),
            &format!("multipart/form-data; boundary={boundary}"),
            &body,
        )?;
        Ok(())
    }

    fn metrics(&self) -> anyhow::Result<HashMap<String, f64>> {
        let mut reply = self.send("GET", "/metrics", "", b"")?;
        let mut text = String::new();
        reply.body.read_to_string(&mut text)?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(k, v)| Some((k.to_string(), v.parse().ok()?))))
            .collect())
    }

    fn stream_completion(&self, body: &Value) -> anyhow::Result<Timing> {
        let start = Instant::now();
        let reply = self.send("POST", "/v1/completions", "application/json", body.to_string().as_bytes())?;
        if reply.status != 200 {
            bail!("status {}", reply.status);
        }
        let (mut first, mut tokens) = (None, 0usize);
        for line in reply.body.lines() {
            let line = line?;
            let Some(data) = line.strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                break;
            }
            let chunk: Value = serde_json::from_str(data)?;
            if chunk.get("error").is_some() {
                bail!("{chunk}");
            }
            if chunk["choices"].as_array().is_some_and(|c| !c.is_empty()) {
                first.get_or_insert_with(Instant::now);
            }
            if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
                tokens = n as usize;
            }
        }
        let end = Instant::now();
        let first = first.context("no tokens")?;
        Ok(Timing {
            ttft: first.duration_since(start).as_secs_f64(),
            tpot: (tokens > 1).then(|| end.duration_since(first).as_secs_f64() / (tokens - 1) as f64),
            e2e: end.duration_since(start).as_secs_f64(),
            tokens,
        })
    }
}

/// Reads a `Transfer-Encoding: chunked` body.
struct Chunked<R: BufRead> {
    inner: R,
    left: usize,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            self.inner.read_line(&mut line)?;
            let size = line.trim().split(';').next().unwrap_or("");
            self.left = usize::from_str_radix(size, 16)
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad chunk size"))?;
            if self.left == 0 {
                self.done = true;
                return Ok(0);
            }
        }
        let want = buf.len().min(self.left);
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n;
        if self.left == 0 {
            let mut crlf = String::new();
            self.inner.read_line(&mut crlf)?;
        }
        Ok(n)
    }
}
