//! Who is calling: the `--api-keys` file (TOML `[[keys]]` tables with `key`, `tenant` and
//! optional `admin = true`; optional `[tenants.NAME]` quota tables, `[tenants."*"]` for every
//! tenant without one), the key check, and the `Caller` extractor.
//!
//! Keys are kept only as SHA-256 digests and compared in constant time against every entry, so
//! neither timing nor logs reveal them; `Debug` prints no key material.

use super::error::ApiError;
use super::quota::{Quota, Quotas};
use super::AppState;
use adapters::store::{AdapterKey, DEFAULT_TENANT};
use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// The `[tenants."*"]` table: quotas of every tenant without a table of its own.
pub const ANY_TENANT: &str = "*";

/// Shortest key accepted in the keys file: shorter ones are guessable.
pub const MIN_KEY_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read the keys file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("keys file: {0}")]
    Parse(String),
    #[error("keys file: entry {index}: {reason}")]
    Entry { index: usize, reason: String },
}

/// The caller of a request, after authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub tenant: String,
    /// Sees every tenant's adapters and may read `/metrics` of a keyed server.
    pub admin: bool,
}

impl Caller {
    /// The caller of an open server (no keys file).
    pub fn open() -> Self {
        Self { tenant: DEFAULT_TENANT.to_string(), admin: false }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    keys: Vec<KeyEntry>,
    #[serde(default)]
    tenants: HashMap<String, Quota>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    key: String,
    tenant: String,
    #[serde(default)]
    admin: bool,
}

/// The keys of a keyed server.
pub struct ApiKeys {
    entries: Vec<([u8; 32], Caller)>,
    quotas: Arc<Quotas>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys").field("keys", &self.entries.len()).finish_non_exhaustive()
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Equality of two digests without an early exit.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

impl ApiKeys {
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| AuthError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text)
    }

    /// Parses and checks the file: at least one key, keys long enough and distinct, tenants that
    /// are valid adapter-store names. Errors never quote a key.
    pub fn parse(text: &str) -> Result<Self, AuthError> {
        // The line, never the text around it: that could be a key.
        let file: KeysFile = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(0, |span| text[..span.start.min(text.len())].lines().count().max(1));
            AuthError::Parse(format!("line {line}: {}", e.message()))
        })?;
        if file.keys.is_empty() {
            return Err(AuthError::Parse("no [[keys]] entries".into()));
        }
        let mut entries: Vec<([u8; 32], Caller)> = Vec::new();
        for (i, e) in file.keys.into_iter().enumerate() {
            let index = i + 1;
            if e.key.len() < MIN_KEY_LEN || e.key.chars().any(char::is_whitespace) {
                return Err(AuthError::Entry {
                    index,
                    reason: format!("`key` must be at least {MIN_KEY_LEN} characters without spaces"),
                });
            }
            AdapterKey::new(e.tenant.clone(), "x")
                .map_err(|err| AuthError::Entry { index, reason: err.to_string() })?;
            let d = digest(&e.key);
            if entries.iter().any(|(other, _)| same_digest(other, &d)) {
                return Err(AuthError::Entry { index, reason: "the same key appears twice".into() });
            }
            entries.push((d, Caller { tenant: e.tenant, admin: e.admin }));
        }
        let mut tenants = file.tenants;
        let default = tenants.remove(ANY_TENANT).unwrap_or_default();
        for name in tenants.keys() {
            AdapterKey::new(name.clone(), "x")
                .map_err(|err| AuthError::Parse(format!("[tenants.{name}]: {err}")))?;
        }
        Ok(Self { entries, quotas: Arc::new(Quotas::new(tenants, default)) })
    }

    /// The tenants' quotas (`[tenants.NAME]` tables).
    pub fn quotas(&self) -> Arc<Quotas> {
        Arc::clone(&self.quotas)
    }

    /// The caller a presented key belongs to. Every entry is compared, in constant time each.
    pub fn caller(&self, presented: &str) -> Option<Caller> {
        let d = digest(presented);
        let mut found = None;
        for (key, caller) in &self.entries {
            if same_digest(key, &d) {
                found = Some(caller.clone());
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// How the server authenticates.
#[derive(Debug)]
pub enum Auth {
    /// No keys file: everyone is the default tenant.
    Open,
    Keys(ApiKeys),
}

impl Auth {
    /// The caller for an `Authorization` header value (or its absence).
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, ApiError> {
        match self {
            Auth::Open => Ok(Caller::open()),
            Auth::Keys(keys) => {
                let presented = authorization
                    .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
                    .map(str::trim)
                    .ok_or(ApiError::Unauthorized)?;
                keys.caller(presented).ok_or(ApiError::Unauthorized)
            }
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(self, Auth::Open)
    }

    /// The tenants' quotas: the keys file's, or none on an open server.
    pub fn quotas(&self) -> Arc<Quotas> {
        match self {
            Auth::Keys(keys) => keys.quotas(),
            Auth::Open => Arc::default(),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
        state.auth().authenticate(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[keys]]
key = "alice-0123456789abcdef"
tenant = "alice"

[[keys]]
key = "root-0123456789abcdef"
tenant = "ops"
admin = true
"#;

    #[test]
    fn keys_map_to_tenants_and_bad_keys_are_refused() {
        let keys = ApiKeys::parse(FILE).expect("valid file");
        assert_eq!(
            keys.caller("alice-0123456789abcdef"),
            Some(Caller { tenant: "alice".into(), admin: false })
        );
        assert_eq!(keys.caller("root-0123456789abcdef").map(|c| c.admin), Some(true));
        assert_eq!(keys.caller("alice-0123456789abcdeg"), None);
        assert_eq!(keys.caller(""), None);
        let auth = Auth::Keys(keys);
        assert!(matches!(auth.authenticate(None), Err(ApiError::Unauthorized)));
        assert!(matches!(auth.authenticate(Some("alice-0123456789abcdef")), Err(ApiError::Unauthorized)));
        assert_eq!(
            auth.authenticate(Some("Bearer alice-0123456789abcdef")).map(|c| c.tenant).ok(),
            Some("alice".into())
        );
        assert!(!format!("{auth:?}").contains("alice-0123"), "Debug must not print keys");
    }

    #[test]
    fn bad_files_are_refused_without_quoting_keys() {
        for (text, want) in [
            ("", "no [[keys]]"),
            ("[[keys]]\nkey = \"short\"\ntenant = \"a\"\n", "at least 16"),
            ("[[keys]]\nkey = \"0123456789abcdefgh\"\ntenant = \"../x\"\n", "tenant"),
            ("[[keys]]\nkey = \"0123456789abcdefgh\"\ntenant = \"a\"\nrole = \"x\"\n", "role"),
            (
                "[[keys]]\nkey = \"0123456789abcdefgh\"\ntenant = \"a\"\n[[keys]]\nkey = \"0123456789abcdefgh\"\ntenant = \"b\"\n",
                "twice",
            ),
        ] {
            let err = ApiKeys::parse(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(!err.contains("0123456789abcdefgh"), "{err}");
        }
    }
}
