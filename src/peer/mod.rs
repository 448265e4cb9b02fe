//! The peer: pure cores (manager link, serving, download scheduler) and the event loop.

pub mod link;
pub mod scheduler;
