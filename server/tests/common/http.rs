//! A plain HTTP/1.1 client for tests of the real server: one connection per request, raw
//! multipart uploads, and an error (not a panic) when the server goes away mid-response, so a
//! test can tell acknowledged requests from cut ones.

use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const BOUNDARY: &str = "lorahostTestBoundary";

/// One HTTP/1.1 request on its own connection. `Err` when the connection fails or ends before
/// a whole response (the server was killed): such a request was never acknowledged.
pub fn http(
    url: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let authority = url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(authority)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
    let split = reply.windows(4).position(|w| w == b"\r\n\r\n").ok_or(std::io::ErrorKind::UnexpectedEof)?;
    let head = String::from_utf8_lossy(&reply[..split]).into_owned();
    let status =
        head.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or(std::io::ErrorKind::InvalidData)?;
    let mut body = reply[split + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body).ok_or(std::io::ErrorKind::UnexpectedEof)?;
    } else if let Some(len) = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
    {
        if body.len() < len.parse().unwrap_or(usize::MAX) {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok((status, body))
}

/// A chunked body, or `None` if it stops before its last chunk.
fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..line_end]).ok()?.trim(), 16).ok()?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}

/// A JSON request that must be answered; returns the status and the JSON reply.
pub fn json_request(url: &str, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let (status, reply) =
        http(url, method, path, "application/json", body.to_string().as_bytes()).expect("the server answers");
    let value = serde_json::from_slice(&reply).unwrap_or_else(|e| {
        panic!("{method} {path}: {status}, not JSON ({e}): {}", String::from_utf8_lossy(&reply))
    });
    (status, value)
}

/// A `multipart/form-data` body (boundary [`BOUNDARY`]) of (name, filename, bytes) parts.
pub fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, filename, bytes) in parts {
        let filename = filename.map(|f| format!("; filename=\"{f}\"")).unwrap_or_default();
        let head =
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"{filename}\r\n\r\n");
        body.extend_from_slice(head.as_bytes());
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

/// `PUT /v1/adapters/{name}` with a PEFT adapter's (config, weights).
pub fn upload_adapter(
    url: &str,
    name: &str,
    (config, weights): &(Vec<u8>, Vec<u8>),
) -> std::io::Result<(u16, Value)> {
    let body = multipart(&[
        (adapters::store::CONFIG_FILE, Some(adapters::store::CONFIG_FILE), config),
        (adapters::store::WEIGHTS_FILE, Some(adapters::store::WEIGHTS_FILE), weights),
    ]);
    let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
    let (status, reply) = http(url, "PUT", &format!("/v1/adapters/{name}"), &content_type, &body)?;
    let value = serde_json::from_slice(&reply).map_err(|_| std::io::ErrorKind::InvalidData)?;
    Ok((status, value))
}

/// `POST /v1/files` of a fine-tuning JSONL file.
pub fn upload_file(url: &str, bytes: &[u8]) -> std::io::Result<(u16, Value)> {
    let body = multipart(&[("purpose", None, b"fine-tune"), ("file", Some("train.jsonl"), bytes)]);
    let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
    let (status, reply) = http(url, "POST", "/v1/files", &content_type, &body)?;
    let value = serde_json::from_slice(&reply).map_err(|_| std::io::ErrorKind::InvalidData)?;
    Ok((status, value))
}
