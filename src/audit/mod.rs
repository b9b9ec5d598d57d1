//! The tamper-evident audit log. Being written.

pub mod cli;
