//! The peer: pure cores (manager link, serving, download scheduler) and the
//! event loop that drives them.

pub mod commands;
pub mod download;
mod files;
pub mod link;
pub mod node;
pub mod output;
mod progress;
pub mod query;
pub mod ratelimit;
pub mod scheduler;
pub mod serve;
