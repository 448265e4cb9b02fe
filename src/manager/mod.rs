//! The manager: a pure membership registry ([`registry`]) and the mio event
//! loop that serves it over TCP ([`server`]).

mod index;
mod members;
pub mod registry;
pub mod server;
pub mod stats;
mod timers;

pub use registry::{Registry, RegistryConfig};
