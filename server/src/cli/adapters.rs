//! `lorahost adapters list|upload|delete --server URL`: a small client for a running server's
//! `/v1/adapters` routes (plain HTTP/1.1 over hyper; put TLS in front with a proxy).

use crate::http::quota::{AdapterHoldings, Quota};
use crate::jobs::Reserved;
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use sha2::Digest as _;
use std::path::{Path, PathBuf};

#[derive(Debug, Args)]
pub struct AdaptersArgs {
    #[command(subcommand)]
    pub command: AdaptersCommand,
    /// The server, e.g. http://127.0.0.1:8080.
    #[arg(long, global = true, env = "LORAHOST_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// API key (sent as `Authorization: Bearer KEY`).
    #[arg(long, global = true, env = "LORAHOST_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum AdaptersCommand {
    /// List the adapters this key may use.
    List,
    /// Upload a PEFT adapter directory under NAME (replaces an adapter of that name).
    Upload {
        name: String,
        /// Directory with adapter_config.json and adapter_model.safetensors.
        dir: PathBuf,
    },
    /// Delete the adapter NAME.
    Delete { name: String },
}

pub fn run(args: AdaptersArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: AdaptersArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.server, args.api_key.clone()).context("--server")?;
    match &args.command {
        AdaptersCommand::List => {
            let body = client.send(Method::GET, "/v1/adapters", None).await?;
            let list = body["data"].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("no adapters");
            }
            for a in list {
                println!(
                    "{}\trank {}\tgeneration {}\t{} bytes\t{}",
                    a["id"].as_str().unwrap_or("?"),
                    a["rank"],
                    a["generation"],
                    a["bytes"],
                    a["residency"].as_str().unwrap_or("?"),
                );
            }
        }
        AdaptersCommand::Upload { name, dir } => {
            let reply = upload(&client, name, dir).await?;
            println!("{}", serde_json::to_string_pretty(&reply)?);
        }
        AdaptersCommand::Delete { name } => {
            let path = format!("/v1/adapters/{}", encode_segment(name));
            client.send(Method::DELETE, &path, None).await?;
            println!("deleted {name}");
        }
    }
    Ok(())
}

/// Uploads the PEFT adapter directory `dir` as `name`; returns the server's description of it.
async fn upload(client: &Client, name: &str, dir: &Path) -> anyhow::Result<Value> {
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))
    };
    let config = read(adapters::CONFIG_FILE)?;
    let weights = read(adapters::WEIGHTS_FILE)?;
    let (content_type, body) =
        multipart(&[(adapters::CONFIG_FILE, &config), (adapters::WEIGHTS_FILE, &weights)]);
    let path = format!("/v1/adapters/{}", encode_segment(name));
    client.send(Method::PUT, &path, Some((content_type, body))).await
}

/// A server to push a trained adapter to (`lorahost train --push`).
pub struct PushTarget {
    pub server: String,
    pub api_key: Option<String>,
    pub name: String,
}

impl PushTarget {
    /// Checks, before training starts, that the name is valid, the server answers and the key
    /// is accepted, so a long run is not wasted on a typo.
    pub fn check(&self) -> anyhow::Result<()> {
        ::adapters::store::AdapterKey::new(::adapters::store::DEFAULT_TENANT, self.name.as_str())
            .with_context(|| format!("--name {:?}", self.name))?;
        let client = Client::new(&self.server, self.api_key.clone()).context("--push")?;
        block_on(async { client.send(Method::GET, "/v1/adapters", None).await.map(drop) })
            .with_context(|| format!("--push {}", self.server))
    }

    /// Checks, before training starts, that the tenant's quota has room for an adapter of
    /// `bytes` bytes under `name` (replacing an adapter of that name frees its bytes).
    pub fn check_room(&self, bytes: u64) -> anyhow::Result<()> {
        let client = Client::new(&self.server, self.api_key.clone()).context("--push")?;
        let (quota, listing) = block_on(async {
            let quota = client.send(Method::GET, "/v1/quota", None).await?;
            Ok((quota, client.send(Method::GET, "/v1/adapters", None).await?))
        })
        .with_context(|| format!("--push {}", self.server))?;
        room_for(&quota, &listing, &self.name, bytes)
            .with_context(|| format!("--push {}: the adapter would not be accepted", self.server))
    }

    /// Uploads `dir`; when this returns the adapter is servable under `name`.
    pub fn push(&self, dir: &Path) -> anyhow::Result<Value> {
        let client = Client::new(&self.server, self.api_key.clone()).context("--push")?;
        block_on(upload(&client, &self.name, dir)).with_context(|| format!("--push {}", self.server))
    }
}

/// Whether `GET /v1/quota`'s `quota` and `GET /v1/adapters`' `listing` leave room for `bytes`
/// more under `name`, as the server's upload check counts it.
fn room_for(quota: &Value, listing: &Value, name: &str, bytes: u64) -> anyhow::Result<()> {
    let tenant = quota["tenant"].as_str().context("the quota reply names no tenant")?;
    let limits: Quota = serde_json::from_value(quota["limits"].clone())
        .context("the quota reply's limits are not understood")?;
    let usage = &quota["usage"];
    if let Some(most) = quota["upload_limits"]["adapter_bytes"].as_u64() {
        if bytes > most {
            bail!("the adapter is {bytes} bytes; the server takes adapter uploads of at most {most} bytes");
        }
    }
    let count = |field: &str| usage[field].as_u64().unwrap_or(0);
    let holdings = AdapterHoldings {
        count: count("adapters") as usize,
        bytes: count("adapter_bytes"),
        replaced: listing["data"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["tenant"] == tenant && a["name"] == name)
            .map(|a| a["bytes"].as_u64().unwrap_or(0)),
        reserved: Reserved {
            places: count("pending_fine_tuning_jobs") as usize,
            bytes: count("pending_adapter_bytes"),
        },
    };
    let Err(refused) = limits.check_adapter(bytes, &holdings) else { return Ok(()) };
    // The server's refusal, with the numbers that led to it.
    let (held, reserved) = (holdings.count, holdings.reserved);
    if refused.limit().starts_with("adapters held") {
        let most = limits.max_adapters.unwrap_or(0);
        let jobs = if reserved.places > 0 {
            format!(" and {} unfinished fine-tuning jobs", reserved.places)
        } else {
            String::new()
        };
        bail!("tenant {tenant} holds {held} adapters{jobs} and may hold {most}: delete one or push under the name of one it holds");
    }
    let (total, most) = (holdings.bytes_with(bytes), limits.max_adapter_bytes.unwrap_or(0));
    let jobs = if reserved.bytes > 0 {
        format!(", counting {} reserved by unfinished fine-tuning jobs,", reserved.bytes)
    } else {
        String::new()
    };
    bail!("the adapter is {bytes} bytes; tenant {tenant} would then hold {total} bytes of adapters{jobs} and may hold {most}")
}

fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f)
}

struct Client {
    authority: String,
    prefix: String,
    api_key: Option<String>,
}

impl Client {
    fn new(server: &str, api_key: Option<String>) -> anyhow::Result<Self> {
        // The caller's context names the flag (`--server` or `--push`).
        let uri: Uri = server.parse().with_context(|| format!("{server:?} is not a URL"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => bail!("{server:?}: only http:// is supported here, not {other}://"),
            None => bail!("{server:?} must start with http://"),
        }
        let authority = uri.authority().with_context(|| format!("{server:?} has no host"))?.to_string();
        let authority = if uri.port().is_some() { authority } else { format!("{authority}:80") };
        // Every path sent starts with `/v1`: an OpenAI-style base URL (`.../v1`) means its root.
        let path = uri.path().trim_end_matches('/');
        let prefix = path.strip_suffix("/v1").unwrap_or(path).to_string();
        Ok(Self { authority, prefix, api_key })
    }

    /// Sends one request and returns the JSON reply; a non-2xx reply is an error with the
    /// server's message.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(String, Vec<u8>)>,
    ) -> anyhow::Result<Value> {
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .with_context(|| format!("cannot connect to {}", self.authority))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.prefix))
            .header(hyper::header::HOST, &self.authority);
        if let Some(key) = &self.api_key {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let (content_type, bytes) = body.unwrap_or_default();
        if !content_type.is_empty() {
            request = request.header(hyper::header::CONTENT_TYPE, content_type);
        }
        let response = sender.send_request(request.body(Full::new(Bytes::from(bytes)))?).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !status.is_success() {
            let message = value["error"]["message"].as_str().map(str::to_string);
            bail!("{status}: {}", message.unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned()));
        }
        Ok(value)
    }
}

/// A `multipart/form-data` body of files; returns the content type and the bytes.
fn multipart(parts: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    // Derived from the content, so it cannot be a prefix the content was made to contain.
    let mut h = sha2::Sha256::new();
    for (_, bytes) in parts {
        sha2::Digest::update(&mut h, bytes);
    }
    let boundary = format!("lorahost-{}", crate::fetch::hex(&sha2::Digest::finalize(h)[..16]));
    let mut body = Vec::new();
    for (name, bytes) in parts {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// Percent-encodes a path segment (adapter names are plain, but a bad one should reach the
/// server as written and be refused there, not change the path).
fn encode_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{room_for, Client};
    use serde_json::json;

    #[test]
    fn a_server_url_may_be_the_root_a_path_below_it_or_an_openai_base_url() {
        for (url, authority, prefix) in [
            ("http://127.0.0.1:8080", "127.0.0.1:8080", ""),
            ("http://host", "host:80", ""),
            ("http://host:8080/lorahost/", "host:8080", "/lorahost"),
            ("http://host:8080/v1", "host:8080", ""),
            ("http://host:8080/lorahost/v1/", "host:8080", "/lorahost"),
        ] {
            let c = Client::new(url, None).expect(url);
            assert_eq!((c.authority.as_str(), c.prefix.as_str()), (authority, prefix), "{url}");
        }
        for bad in ["127.0.0.1:8080", "https://host", "not a url"] {
            assert!(Client::new(bad, None).is_err(), "{bad}");
        }
    }

    fn quota(
        max_adapters: Option<u64>,
        max_bytes: Option<u64>,
        held: u64,
        held_bytes: u64,
    ) -> serde_json::Value {
        json!({
            "tenant": "alice",
            "limits": {"max_adapters": max_adapters, "max_adapter_bytes": max_bytes},
            "usage": {"adapters": held, "adapter_bytes": held_bytes},
        })
    }

    fn listing() -> serde_json::Value {
        json!({"data": [
            {"tenant": "alice", "name": "old", "bytes": 600},
            {"tenant": "bob", "name": "new", "bytes": 900},
        ]})
    }

    #[test]
    fn a_push_must_fit_the_quota_as_the_server_counts_it() {
        let none = quota(None, None, 1, 600);
        assert!(room_for(&none, &listing(), "new", 1 << 40).is_ok(), "no limits, no refusal");

        let one = quota(Some(1), None, 1, 600);
        let e = room_for(&one, &listing(), "new", 10).expect_err("a second name");
        assert!(format!("{e}").contains("may hold 1"), "{e}");
        assert!(room_for(&one, &listing(), "old", 10).is_ok(), "replacing the one held");
        let mut reserved = quota(Some(2), None, 1, 600);
        assert!(room_for(&reserved, &listing(), "new", 10).is_ok(), "one place left");
        reserved["usage"]["pending_fine_tuning_jobs"] = json!(1);
        let e = room_for(&reserved, &listing(), "new", 10).expect_err("the last place is a job's");
        assert!(format!("{e}").contains("1 unfinished fine-tuning jobs"), "{e}");
        assert!(room_for(&reserved, &listing(), "old", 10).is_ok(), "replacing needs no place");

        let bytes = quota(None, Some(1000), 1, 600);
        assert!(room_for(&bytes, &listing(), "new", 400).is_ok(), "600 + 400 fits 1000");
        let e = room_for(&bytes, &listing(), "new", 401).expect_err("1001 > 1000");
        assert!(format!("{e}").contains("1001") && format!("{e}").contains("1000"), "{e}");
        assert!(room_for(&bytes, &listing(), "old", 1000).is_ok(), "replacing frees the old 600 bytes");
        let mut with_job = bytes.clone();
        with_job["usage"]["pending_adapter_bytes"] = json!(100);
        assert!(room_for(&with_job, &listing(), "new", 300).is_ok(), "600 + 100 + 300 fits 1000");
        let e = room_for(&with_job, &listing(), "new", 301).expect_err("600 + 100 + 301");
        assert!(format!("{e}").contains("100 reserved by unfinished fine-tuning jobs"), "{e}");
        assert!(room_for(&json!({}), &listing(), "new", 1).is_err(), "a reply without a tenant");

        let mut capped = quota(None, None, 0, 0);
        capped["upload_limits"] = json!({"adapter_bytes": 500});
        assert!(room_for(&capped, &listing(), "new", 500).is_ok(), "an upload of the largest size");
        let e = room_for(&capped, &listing(), "new", 501).expect_err("over the server's upload limit");
        assert!(format!("{e}").contains("at most 500"), "{e}");
    }
}
