//! capy's workers. [`runner`] is the worker loop (claim, heartbeat, rescue, drain);
//! [`process`] runs one attempt's step as a child process; [`handlers`] knows what
//! each job type needs as input and what its outcome does to the project; [`steps`]
//! are the built-in steps run by the `capy-step` binary. The queue's SQL is in
//! `capy_shared::queue`.

pub mod config;
pub mod handlers;
pub mod metrics;
pub mod process;
pub mod runner;
pub mod steps;
pub mod sweeps;
