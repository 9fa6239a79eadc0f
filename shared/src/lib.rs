//! What capy's API, workers and steps share: the domain types, the queue's SQL, the
//! step contract, secrets handling and telemetry.

pub mod backups;
pub mod crypto;
pub mod db;
pub mod effects;
pub mod engines;
pub mod ident;
pub mod instant;
pub mod model;
pub mod periodic;
pub mod previews;
pub mod queue;
pub mod redact;
pub mod restores;
pub mod step;
pub mod store;
pub mod telemetry;
pub mod tls;
