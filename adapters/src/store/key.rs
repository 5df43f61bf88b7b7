//! `AdapterKey`: the tenant-scoped name an adapter is stored under. Both parts become path
//! components under the store's root, so they are validated once, here, and a key that exists
//! is safe to join onto a path.

use super::StoreError;

/// The tenant that single-tenant setups (no `--api-keys`, the CLI) store adapters under.
pub const DEFAULT_TENANT: &str = "default";

/// The longest tenant or adapter name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// A tenant-scoped adapter name: the same name in two tenants is two adapters.
///
/// Both parts are 1 to [`MAX_NAME_LEN`] characters of `[A-Za-z0-9._-]` and do not start with
/// `.`, so neither can be empty, `.`, `..`, hidden, or contain a path separator.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdapterKey {
    tenant: String,
    name: String,
}

impl AdapterKey {
    /// Validates both parts.
    pub fn new(tenant: impl Into<String>, name: impl Into<String>) -> Result<Self, StoreError> {
        let (tenant, name) = (tenant.into(), name.into());
        validate_part("tenant", &tenant)?;
        validate_part("name", &name)?;
        Ok(Self { tenant, name })
    }

    /// `name` under [`DEFAULT_TENANT`].
    pub fn in_default_tenant(name: impl Into<String>) -> Result<Self, StoreError> {
        Self::new(DEFAULT_TENANT, name)
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Display for AdapterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.tenant, self.name)
    }
}

/// Checks one part of a key (`what` is "tenant" or "name", for the error message).
pub fn validate_part(what: &'static str, value: &str) -> Result<(), StoreError> {
    let reason = if value.is_empty() {
        "must not be empty".to_string()
    } else if value.len() > MAX_NAME_LEN {
        format!("is {} bytes long, the limit is {MAX_NAME_LEN}", value.len())
    } else if value.starts_with('.') {
        "must not start with `.`".to_string()
    } else if let Some(c) =
        value.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        format!("contains {c:?}; only A-Z, a-z, 0-9, `.`, `_` and `-` are allowed")
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidKey { what, value: value.chars().take(MAX_NAME_LEN + 8).collect(), reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names_and_refuses_anything_path_like() {
        for ok in ["a", "my-adapter_v1.2", "A.b-C_d", &"x".repeat(MAX_NAME_LEN)] {
            assert!(AdapterKey::new("t", ok).is_ok(), "{ok}");
        }
        let bad = [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../x",
            "a\\b",
            "a b",
            "naïve",
            "a\0b",
            &"x".repeat(MAX_NAME_LEN + 1),
        ];
        for b in bad {
            let err = AdapterKey::new("t", b).unwrap_err().to_string();
            assert!(err.contains("name"), "{b:?}: {err}");
            let err = AdapterKey::new(b, "n").unwrap_err().to_string();
            assert!(err.contains("tenant"), "{b:?}: {err}");
        }
        assert_eq!(AdapterKey::in_default_tenant("x").unwrap().tenant(), DEFAULT_TENANT);
    }
}
