//! Plans: named sets of project defaults per engine (connections, storage, timeouts),
//! from a catalogue in configuration (`CAPY_PLANS_FILE`, a JSON list) or capy's own.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use capy_shared::ident::is_valid_duration;
use capy_shared::model::Engine;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

const GIB: i64 = 1 << 30;

/// One plan of the catalogue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// 1–63 lowercase letters, digits, '-' and '_'.
    pub id: String,
    pub engine: Engine,
    pub description: String,
    pub max_connections: i32,
    /// The project's storage limit; null: none.
    pub storage_limit_bytes: Option<i64>,
    /// PostgreSQL durations such as "60s" (MySQL takes whole seconds of them; Redis
    /// has no such limits).
    pub statement_timeout: String,
    pub idle_transaction_timeout: String,
}

/// The catalogue: plan ids are unique; each engine has at least the plan its projects
/// get when none is named (the first of that engine).
#[derive(Debug, Clone)]
pub struct Plans(Arc<[Plan]>);

impl Default for Plans {
    fn default() -> Self {
        let plan =
            |id: &str, engine, description: &str, conns, gib: Option<i64>, timeout: &str| Plan {
                id: id.into(),
                engine,
                description: description.into(),
                max_connections: conns,
                storage_limit_bytes: gib.map(|g| g * GIB),
                statement_timeout: timeout.into(),
                idle_transaction_timeout: timeout.into(),
            };
        Self(Arc::from(vec![
            plan(
                "free",
                Engine::Postgresql,
                "PostgreSQL: 20 connections, no storage limit",
                20,
                None,
                "60s",
            ),
            plan(
                "pg-small",
                Engine::Postgresql,
                "PostgreSQL: 50 connections, 10 GiB",
                50,
                Some(10),
                "60s",
            ),
            plan(
                "pg-large",
                Engine::Postgresql,
                "PostgreSQL: 200 connections, 100 GiB",
                200,
                Some(100),
                "300s",
            ),
            plan(
                "mysql-small",
                Engine::Mysql,
                "MySQL: 20 connections",
                20,
                None,
                "60s",
            ),
            plan(
                "mysql-large",
                Engine::Mysql,
                "MySQL: 200 connections",
                200,
                None,
                "300s",
            ),
            plan(
                "redis-small",
                Engine::Redis,
                "Redis: an ACL user and a key prefix",
                20,
                None,
                "0",
            ),
        ]))
    }
}

impl Plans {
    /// Reads a catalogue from a JSON file, checked.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the plans file {}", path.display()))?;
        let plans: Vec<Plan> = serde_json::from_str(&text).with_context(|| {
            format!(
                "the plans file {} is not a JSON list of plans",
                path.display()
            )
        })?;
        Self::checked(plans)
    }

    fn checked(plans: Vec<Plan>) -> anyhow::Result<Self> {
        for (i, plan) in plans.iter().enumerate() {
            plan.check()?;
            anyhow::ensure!(
                !plans[..i].iter().any(|p| p.id == plan.id),
                "plan {:?} is listed twice",
                plan.id
            );
        }
        for engine in Engine::ALL {
            anyhow::ensure!(
                plans.iter().any(|p| p.engine == engine),
                "the plans file has no plan for {} (its first plan is the default)",
                engine.as_str()
            );
        }
        Ok(Self(Arc::from(plans)))
    }

    pub fn all(&self) -> &[Plan] {
        &self.0
    }

    pub fn find(&self, id: &str) -> Option<&Plan> {
        self.0.iter().find(|p| p.id == id)
    }

    /// The plan of an engine's projects that name none: its first.
    pub fn default_for(&self, engine: Engine) -> Option<&Plan> {
        self.0.iter().find(|p| p.engine == engine)
    }
}

impl Plan {
    fn check(&self) -> anyhow::Result<()> {
        let label = (1..=63).contains(&self.id.len())
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_".contains(&b));
        anyhow::ensure!(
            label,
            "plan id {:?}: 1 to 63 lowercase letters, digits, '-' and '_'",
            self.id
        );
        anyhow::ensure!(
            crate::routes::projects::MAX_CONNECTIONS_RANGE.contains(&self.max_connections),
            "plan {:?}: max_connections out of range",
            self.id
        );
        anyhow::ensure!(
            self.storage_limit_bytes.is_none_or(|b| b >= 0),
            "plan {:?}: storage_limit_bytes must not be negative",
            self.id
        );
        for value in [&self.statement_timeout, &self.idle_transaction_timeout] {
            anyhow::ensure!(
                is_valid_duration(value),
                "plan {:?}: invalid duration {value:?}",
                self.id
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_catalogue_passes_its_own_checks() {
        let plans = Plans::default();
        Plans::checked(plans.all().to_vec()).expect("valid");
        assert_eq!(
            plans.default_for(Engine::Postgresql).map(|p| p.id.as_str()),
            Some("free")
        );
    }

    #[test]
    fn a_catalogue_missing_an_engine_or_repeating_an_id_is_refused() {
        let mut plans = Plans::default().all().to_vec();
        plans.retain(|p| p.engine != Engine::Redis);
        assert!(Plans::checked(plans.clone()).is_err());
        let mut twice = Plans::default().all().to_vec();
        twice.push(twice[0].clone());
        assert!(Plans::checked(twice).is_err());
    }
}
