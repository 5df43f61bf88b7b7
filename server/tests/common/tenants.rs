//! The keys file the router tests share: tenants `alice` and `bob`, and an admin of tenant `ops`.

pub const ALICE: &str = "alice-key-0123456789";
pub const BOB: &str = "bob-key-0123456789ab";
pub const ROOT: &str = "root-key-0123456789a";
pub const KEYS: &str = r#"
[[keys]]
key = "alice-key-0123456789"
tenant = "alice"

[[keys]]
key = "bob-key-0123456789ab"
tenant = "bob"

[[keys]]
key = "root-key-0123456789a"
tenant = "ops"
admin = true
"#;
