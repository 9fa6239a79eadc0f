//! The queue's periodic jobs (`periodic_jobs`): rows that queue a job at each slot
//! (daily at a UTC time, or every N seconds), exactly once per slot however many
//! workers look, and once after downtime rather than once per missed slot.
//!
//! (Interface agreed for issue 12; the bodies are filled by the periodic work.)
