//! shoal: peer-to-peer file transfer.
//!
//! Layers, from the bytes up:
//! - [`wire`]: frames and messages, pure encode/decode.
//! - [`store`]: the shared folder: file index, chunk hashing, partial downloads.
//! - [`net`]: the mio plumbing shared by both binaries: buffered connections,
//!   deadlines, stdin and signals as event sources.
//! - [`manager`]: the membership registry (a pure core) and its event loop.
//! - [`metrics`]: counters and the `--metrics` HTTP endpoint both binaries serve.
//! - [`text`]: escaping untrusted names and reasons before anyone sees them.
//! - [`peer`]: the peer's pure cores (manager link, serving, download
//!   scheduler) and the event loop that drives them.
//!
//! Protocol logic never touches a socket or reads the clock: cores take
//! decoded messages and `now`, and hand back actions and deadlines.

pub mod cli;
pub mod logging;
pub mod manager;
pub mod metrics;
pub mod net;
pub mod peer;
pub mod store;
pub mod text;
pub mod wire;
