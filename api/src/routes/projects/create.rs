//! `POST /v1/projects`: records the project, places it on a cluster and queues its
//! `project.create` job.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use capy_shared::crypto;
use capy_shared::model::{job_type, Engine, Job};
use serde::Deserialize;
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{fetch_project, queue_project_job, validate};
use crate::auth::{Principal, SCOPE_WRITE};
use crate::bodies::{ErrorResponses, JobAndProject};
use crate::error::{ApiError, ApiResult};
use crate::extract;
use crate::idempotency::Idempotent;
use crate::plans::Plan;
use crate::AppState;

/// Instant databases' connection limit.
pub(crate) const DEFAULT_MAX_CONNECTIONS: i32 = 20;
const GIB: i64 = 1 << 30;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProject {
    /// 1–63 letters, digits, '-' and '_'; unique among the organization's projects.
    #[schema(schema_with = crate::bodies::project_name)]
    name: String,
    /// `postgresql` (default), `mysql` or `redis`: the project is placed on a cluster
    /// of this engine. Left out with a `plan`, the plan's engine.
    engine: Option<Engine>,
    /// A plan of `GET /v1/plans` (of the project's engine), whose settings are the
    /// defaults of those left out here; without one, the engine's first plan.
    #[schema(pattern = "^[a-z0-9_-]{1,63}$")]
    plan: Option<String>,
    /// Place the project on a cluster of this region.
    #[schema(schema_with = crate::bodies::label_or_null)]
    region: Option<String>,
    /// Place the project on this cluster.
    cluster_id: Option<Uuid>,
    #[schema(schema_with = crate::bodies::label_or_null)]
    environment: Option<String>,
    #[serde(default, deserialize_with = "crate::bodies::whole")]
    #[schema(minimum = 1, maximum = 1000)]
    max_connections: Option<i32>,
    /// A PostgreSQL duration such as "30s"; "0" is no limit.
    #[schema(schema_with = crate::bodies::duration)]
    statement_timeout: Option<String>,
    #[schema(schema_with = crate::bodies::duration)]
    idle_transaction_timeout: Option<String>,
    #[serde(default, deserialize_with = "crate::bodies::whole")]
    #[schema(minimum = 0)]
    storage_limit_bytes: Option<i64>,
    /// The storage limit in GiB (CapyDB's `storage_gb`); not with `storage_limit_bytes`.
    #[serde(default, deserialize_with = "crate::bodies::whole")]
    #[schema(minimum = 1, maximum = 65536)]
    storage_gb: Option<i64>,
}

impl CreateProject {
    fn validate(&self) -> ApiResult<()> {
        validate::name(&self.name)?;
        validate::label("region", self.region.as_deref())?;
        validate::label("environment", self.environment.as_deref())?;
        validate::max_connections(self.max_connections)?;
        validate::duration("statement_timeout", self.statement_timeout.as_deref())?;
        validate::duration(
            "idle_transaction_timeout",
            self.idle_transaction_timeout.as_deref(),
        )?;
        validate::storage_limit(self.storage_limit_bytes)?;
        match (self.storage_gb, self.storage_limit_bytes) {
            // Each is valid alone, as the document states: 422, not 400.
            (Some(_), Some(_)) => Err(ApiError::Unprocessable(
                "give storage_gb or storage_limit_bytes, not both".into(),
            )),
            (Some(gb), None) if !(1..=65536).contains(&gb) => Err(ApiError::BadRequest(
                "storage_gb must be between 1 and 65536".into(),
            )),
            _ => Ok(()),
        }
    }

    /// The storage limit asked for, in bytes.
    fn storage_limit(&self) -> Option<i64> {
        self.storage_gb
            .map(|gb| gb * GIB)
            .or(self.storage_limit_bytes)
    }
}

#[derive(sqlx::FromRow)]
struct Placement {
    id: Uuid,
    region: String,
}

/// Creates a project; answers 202 with it and its `project.create` job.
#[utoipa::path(post, path = "/v1/projects", tag = "projects",
    request_body = CreateProject,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for a repeated key")),
    responses((status = 202, body = JobAndProject), ErrorResponses))]
pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    idempotent: Idempotent,
    extract::Json(body): extract::Json<CreateProject>,
) -> ApiResult<(StatusCode, Json<JobAndProject>)> {
    principal.require_scope(SCOPE_WRITE)?;
    let organization_id = principal.organization()?;
    if principal.project_id.is_some() {
        return Err(ApiError::Forbidden(
            "a project-scoped API key cannot create projects",
        ));
    }
    body.validate()?;

    let mut tx = state.pool.begin().await?;
    let spec = ProjectSpec {
        id: Uuid::now_v7(),
        engine: body.engine.unwrap_or_else(|| {
            let plan = body
                .plan
                .as_deref()
                .and_then(|id| state.settings.plans.find(id));
            plan.map_or(Engine::Postgresql, |p| p.engine)
        }),
        plan: body.plan.clone(),
        storage_limit_bytes: body.storage_limit(),
        name: body.name,
        region: body.region,
        cluster_id: body.cluster_id,
        environment: body.environment,
        max_connections: body.max_connections,
        statement_timeout: body.statement_timeout,
        idle_transaction_timeout: body.idle_transaction_timeout,
    };
    let job = create_project(&mut tx, &state, organization_id, &spec).await?;
    let id = spec.id;
    let project = fetch_project(&mut tx, id)
        .await?
        .ok_or(ApiError::NotFound("project"))?;
    idempotent
        .commit(
            &state,
            tx,
            StatusCode::ACCEPTED,
            JobAndProject { job, project },
        )
        .await
}

/// A project to make, its input checked; what is left out takes the defaults.
#[derive(Debug, Clone)]
pub(crate) struct ProjectSpec {
    pub id: Uuid,
    pub engine: Engine,
    /// A plan id of the catalogue; `None`: the engine's default plan.
    pub plan: Option<String>,
    pub name: String,
    pub region: Option<String>,
    pub cluster_id: Option<Uuid>,
    pub environment: Option<String>,
    pub max_connections: Option<i32>,
    pub statement_timeout: Option<String>,
    pub idle_transaction_timeout: Option<String>,
    pub storage_limit_bytes: Option<i64>,
}

/// Records the project `spec` of the organization, placed on a cluster, and queues its
/// `project.create` job, in the caller's transaction: how every project is made
/// (`POST /v1/projects`, a restore into a new project).
pub(crate) async fn create_project(
    tx: &mut sqlx::PgConnection,
    state: &AppState,
    organization_id: Uuid,
    spec: &ProjectSpec,
) -> ApiResult<Job> {
    let plan = plan_of(state, spec)?;
    let placement = place(tx, spec.engine, spec.region.as_deref(), spec.cluster_id).await?;
    // Database and role names come from the id, never from user input.
    let database_name = format!("capy_{}", spec.id.simple());
    let password = state.secrets.seal(&crypto::generate_password());
    let inserted = sqlx::query(
        "insert into projects (id, organization_id, cluster_id, name, slug, region, environment,
             state, database_name, role_name, password_encrypted, max_connections,
             statement_timeout, idle_transaction_timeout, storage_limit_bytes, engine, plan)
         values ($1, $2, $3, $4, $5, $6, $7, 'provisioning', $8, $14, $9, $10, $11, $12, $13,
                 $15, $16)",
    )
    .bind(spec.id)
    .bind(organization_id)
    .bind(placement.id)
    .bind(&spec.name)
    .bind(spec.name.to_ascii_lowercase())
    .bind(&placement.region)
    .bind(spec.environment.as_deref().unwrap_or("development"))
    .bind(&database_name)
    .bind(&password)
    .bind(spec.max_connections.unwrap_or(plan.max_connections))
    .bind(
        spec.statement_timeout
            .as_deref()
            .unwrap_or(&plan.statement_timeout),
    )
    .bind(
        spec.idle_transaction_timeout
            .as_deref()
            .unwrap_or(&plan.idle_transaction_timeout),
    )
    .bind(spec.storage_limit_bytes.or(plan.storage_limit_bytes))
    .bind(spec.engine.login_name(spec.id))
    .bind(spec.engine)
    .bind(&plan.id)
    .execute(&mut *tx)
    .await;
    if let Err(sqlx::Error::Database(db)) = &inserted {
        if db.constraint() == Some("projects_org_name") {
            return Err(ApiError::Conflict(format!(
                "a project named '{}' already exists",
                spec.name
            )));
        }
    }
    inserted?;
    queue_project_job(tx, state, spec.id, job_type::PROJECT_CREATE, json!({})).await
}

/// The plan `spec` names (which must be of its engine), else its engine's default.
fn plan_of<'a>(state: &'a AppState, spec: &ProjectSpec) -> ApiResult<&'a Plan> {
    let plans = &state.settings.plans;
    let plan = match spec.plan.as_deref() {
        None => plans.default_for(spec.engine),
        Some(id) => Some(plans.find(id).ok_or_else(|| {
            ApiError::Unprocessable(format!(
                "no plan is named '{id}' (GET /v1/plans lists them)"
            ))
        })?),
    };
    let plan = plan.ok_or_else(|| {
        ApiError::Unprocessable(format!("no plan is offered for {}", spec.engine.as_str()))
    })?;
    if plan.engine != spec.engine {
        return Err(ApiError::Unprocessable(format!(
            "plan '{}' is a {} plan, not a {} one",
            plan.id,
            plan.engine.as_str(),
            spec.engine.as_str()
        )));
    }
    // Only PostgreSQL projects have their storage measured (and writes stopped past the
    // limit): a limit capy would not hold is refused, not recorded.
    if !spec.engine.is_postgresql()
        && (spec.storage_limit_bytes.or(plan.storage_limit_bytes)).is_some()
    {
        return Err(ApiError::Unprocessable(format!(
            "a {} project cannot have a storage limit: capy does not enforce one for it",
            spec.engine.as_str()
        )));
    }
    Ok(plan)
}

/// The cluster asked for, or the one of the engine and region (any region if none) with
/// the most room. Clusters are locked, so two creations cannot both take a cluster's
/// last place.
async fn place(
    tx: &mut sqlx::PgConnection,
    engine: Engine,
    region: Option<&str>,
    cluster_id: Option<Uuid>,
) -> ApiResult<Placement> {
    let mut candidates = lock_clusters(tx, region, cluster_id).await?;
    if let Some(other) = candidates
        .iter()
        .find(|c| c.engine != engine && cluster_id.is_some())
    {
        return Err(ApiError::Unprocessable(format!(
            "cluster {} runs {}, not {}",
            other.id,
            other.engine.as_str(),
            engine.as_str()
        )));
    }
    candidates.retain(|c| c.engine == engine);
    if let Some(cluster_id) = cluster_id {
        if candidates.is_empty() {
            let exists: Option<String> =
                sqlx::query_scalar("select region from clusters where id = $1")
                    .bind(cluster_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            return Err(ApiError::Unprocessable(match exists {
                Some(actual) => format!(
                    "cluster {cluster_id} is in region '{actual}', not '{}'",
                    region.unwrap_or_default()
                ),
                None => format!("no cluster has the id {cluster_id}"),
            }));
        }
    }
    let roomy = candidates
        .iter()
        .filter(|c| c.has_room())
        .min_by_key(|c| c.held);
    match (roomy, candidates.is_empty()) {
        (Some(c), _) => Ok(Placement {
            id: c.id,
            region: c.region.clone(),
        }),
        (None, true) => Err(ApiError::Unprocessable(match region {
            Some(region) => format!(
                "no {} cluster is registered in region '{region}'",
                engine.as_str()
            ),
            None => format!("no {} cluster is registered", engine.as_str()),
        })),
        (None, false) => Err(ApiError::Unprocessable(match (cluster_id, region) {
            (Some(id), _) => format!("cluster {id} is full (its project limit is reached)"),
            (None, Some(region)) => format!(
                "every cluster in region '{region}' is full (their project limits are reached)"
            ),
            (None, None) => "every cluster is full (their project limits are reached)".into(),
        })),
    }
}

/// A cluster's room for organizations' projects, read under the cluster's lock.
#[derive(sqlx::FromRow)]
pub(crate) struct ClusterRoom {
    id: Uuid,
    region: String,
    engine: Engine,
    max_projects: Option<i32>,
    /// The organizations' projects and the preview databases it holds.
    held: i64,
}

impl ClusterRoom {
    pub(crate) fn has_room(&self) -> bool {
        self.max_projects
            .is_none_or(|max| self.held < i64::from(max))
    }
}

/// The clusters of `region` (any if none), or cluster `cluster_id` alone, locked (so
/// two callers cannot both take a cluster's last place) with the projects and preview
/// databases each holds against `max_projects`: the one count placement, claiming and
/// previews share.
pub(crate) async fn lock_clusters(
    tx: &mut sqlx::PgConnection,
    region: Option<&str>,
    cluster_id: Option<Uuid>,
) -> sqlx::Result<Vec<ClusterRoom>> {
    let locked: Vec<Uuid> = sqlx::query_scalar(
        "select id from clusters
         where ($1::text is null or region = $1) and ($2::uuid is null or id = $2)
         order by created_at
         for update",
    )
    .bind(region)
    .bind(cluster_id)
    .fetch_all(&mut *tx)
    .await?;
    // Counted by a statement of its own, after the lock: a statement that waited for
    // the lock still sees the projects as they were when it began (READ COMMITTED).
    // `max_projects` is the organizations' room: instant databases nobody has claimed
    // (organization_id null) have a bound of their own and take none of it. A preview
    // database is a database of its own on the cluster: it takes a place until deleted.
    sqlx::query_as(
        "select c.id, c.region, c.engine, c.max_projects,
                (select count(*) from projects p where p.cluster_id = c.id and p.deleted_at is null
                   and p.organization_id is not null)
                + (select count(*) from preview_databases v
                   where v.cluster_id = c.id and v.deleted_at is null) as held
         from clusters c where c.id = any($1)
         order by c.created_at",
    )
    .bind(&locked)
    .fetch_all(tx)
    .await
}
