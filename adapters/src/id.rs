//! Adapter identity: the SHA-256 of an adapter's files, so the same bytes are the same adapter
//! whatever name or tenant refers to them, and a re-upload under the same name is a new
//! generation.

use sha2::{Digest, Sha256};

/// Content hash of an adapter (config and weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdapterId([u8; 32]);

impl AdapterId {
    /// Hashes the config and the weights with length prefixes, so moving bytes from one file
    /// to the other changes the id.
    pub fn of_files(config: &[u8], weights: &[u8]) -> Self {
        let mut h = Sha256::new();
        for part in [config, weights] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        Self(h.finalize().into())
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Display for AdapterId {
    /// The first 16 hex digits: enough to tell adapters apart in logs and listings.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex()[..16])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_bytes_same_id_and_boundaries_matter() {
        let a = AdapterId::of_files(b"{}", b"weights");
        assert_eq!(a, AdapterId::of_files(b"{}", b"weights"));
        assert_ne!(a, AdapterId::of_files(b"{}", b"weightz"));
        assert_ne!(AdapterId::of_files(b"ab", b"c"), AdapterId::of_files(b"a", b"bc"));
        assert_eq!(a.to_hex().len(), 64);
        assert_eq!(a.to_string().len(), 16);
    }
}
