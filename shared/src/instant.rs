//! Instant databases: projects nobody owns yet. Workers keep a warm pool of them per
//! cluster; the API hands one out at once and queues its replacement; unclaimed ones
//! past their expiry are deleted. All of their SQL is here.
//!
//! Each cluster holds at most `max_per_cluster` of them (pool entries and unclaimed
//! databases together): every new one is counted and inserted under a lock of its
//! cluster's ([`create_within`]), so concurrent requests cannot both take the last
//! place. They have their own bound: organizations' `max_projects` does not count them.
//!
//! Each client holds at most a few live unclaimed ones ([`ClientCaps`]): counted under
//! a lock of the client's site ([`lock_client`]), always taken before any cluster's,
//! so one client cannot fill a cluster's bound for the 72 hours they live.

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::crypto::{self, SecretBox};
use crate::model::job_type;
use crate::queue::{self, NewJob};

/// Limits of a database nobody has claimed: few connections, a small storage budget.
#[derive(Debug, Clone, Copy)]
pub struct InstantLimits {
    pub max_connections: i32,
    pub storage_limit_bytes: i64,
    pub max_attempts: i32,
    /// Pool entries and unclaimed databases one cluster may hold at once.
    pub max_per_cluster: i64,
}

impl Default for InstantLimits {
    fn default() -> Self {
        Self {
            max_connections: 5,
            storage_limit_bytes: 512 * 1024 * 1024,
            max_attempts: 5,
            max_per_cluster: DEFAULT_MAX_PER_CLUSTER,
        }
    }
}

/// Instant databases a cluster may hold unless configured otherwise.
pub const DEFAULT_MAX_PER_CLUSTER: i64 = 100;

/// The rule of the bound: the instant databases that hold a place on cluster `c`,
/// pool entries and unclaimed ones, until they are deleted (one being deleted still
/// exists on the cluster). The index `projects_instant_live` serves it.
const HOLDS_A_PLACE: &str = "p.instant_status in ('pool', 'unclaimed') and p.deleted_at is null";

/// What a cluster holds of instant databases, read under its lock.
#[derive(Debug, Clone, Copy, sqlx::FromRow)]
struct Held {
    /// Pool entries and unclaimed databases.
    total: i64,
    /// Pool entries provisioning or ready.
    pooled: i64,
}

/// Takes the lock of `cluster_id`'s instant databases (until the transaction ends) and
/// counts them: whoever holds the lock sees every place taken before it.
async fn lock_cluster(conn: &mut PgConnection, cluster_id: Uuid) -> sqlx::Result<Held> {
    sqlx::query("select pg_advisory_xact_lock(hashtextextended('capy:instant:' || $1::text, 0))")
        .bind(cluster_id)
        .execute(&mut *conn)
        .await?;
    sqlx::query_as(&format!(
        "select count(*) as total,
                count(*) filter (where p.instant_status = 'pool'
                                   and p.state in ('provisioning', 'ready')) as pooled
         from projects p where p.cluster_id = $1 and {HOLDS_A_PLACE}"
    ))
    .bind(cluster_id)
    .fetch_one(conn)
    .await
}

/// The instant databases `cluster_id` holds, without its lock (a hint: it may be
/// out of date by the time it is read).
/// A cluster (`c`) may hold an instant database with logical replication (whose role
/// has REPLICATION): its last access check read `wal_level = logical` and found
/// physical replication (the whole cluster's WAL) closed to roles other than the admin.
pub const FIT_FOR_LOGICAL: &str =
    "(c.wal_level = 'logical' and c.physical_replication_open is false)";

async fn count_on_cluster(conn: &mut PgConnection, cluster_id: Uuid) -> sqlx::Result<i64> {
    sqlx::query_scalar(&format!(
        "select count(*) from projects p where p.cluster_id = $1 and {HOLDS_A_PLACE}"
    ))
    .bind(cluster_id)
    .fetch_one(conn)
    .await
}

/// The clusters (when `logical_only`, only those fit for logical replication: see
/// [`FIT_FOR_LOGICAL`]) with how many instant databases each holds, fewest first; not
/// locked, so a choice made from it is checked again by [`create_within`].
pub async fn clusters_by_load(pool: &PgPool, logical_only: bool) -> sqlx::Result<Vec<(Uuid, i64)>> {
    sqlx::query_as(&format!(
        "select c.id, (select count(*) from projects p where p.cluster_id = c.id and {HOLDS_A_PLACE}) as held
         from clusters c where c.engine = 'postgresql' and (not $1 or {FIT_FOR_LOGICAL})
         order by held, c.created_at"
    ))
    .bind(logical_only)
    .fetch_all(pool)
    .await
}

/// [`create`] if `cluster_id` holds fewer than `limits.max_per_cluster` instant
/// databases, counted under the cluster's lock; `None` (nothing recorded, nothing
/// queued) at the bound. The transaction must be READ COMMITTED (the default), so the
/// count taken once the lock is held sees every place taken before.
pub async fn create_within(
    conn: &mut PgConnection,
    secrets: &SecretBox,
    cluster_id: Uuid,
    entry: Entry,
    limits: InstantLimits,
) -> sqlx::Result<Option<(Uuid, Uuid)>> {
    // At the bound, most callers are refused by a probe that waits for no lock.
    if count_on_cluster(&mut *conn, cluster_id).await? >= limits.max_per_cluster
        || lock_cluster(&mut *conn, cluster_id).await?.total >= limits.max_per_cluster
    {
        return Ok(None);
    }
    create(conn, secrets, cluster_id, entry, limits)
        .await
        .map(Some)
}

/// What kind of instant database to record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// A warm pool entry, waiting to be handed out.
    Pool,
    /// Made for one request, because the pool was empty or the request needs what the
    /// pool's entries lack (logical replication).
    OnTheSpot { logical_replication: bool },
}

/// Queues a job of instant database `id` (nobody's yet, so no organization), behind its
/// other jobs.
async fn queue_job(
    conn: &mut PgConnection,
    job_type: &str,
    id: Uuid,
    cluster_id: Uuid,
    max_attempts: i32,
) -> sqlx::Result<crate::model::Job> {
    queue::enqueue(
        conn,
        &NewJob {
            job_type: job_type.into(),
            organization_id: None,
            project_id: Some(id),
            preview_database_id: None,
            cluster_id: Some(cluster_id),
            locked_resource: Some(format!("project:{id}")),
            max_attempts,
            args: serde_json::json!({}),
            run_at: None,
        },
    )
    .await
}

/// Records an instant database on `cluster_id` and queues its `project.create` job;
/// answers the project's id and the job's id. It does not look at the bound: the
/// service goes through [`create_within`].
pub async fn create(
    conn: &mut PgConnection,
    secrets: &SecretBox,
    cluster_id: Uuid,
    entry: Entry,
    limits: InstantLimits,
) -> sqlx::Result<(Uuid, Uuid)> {
    let id = Uuid::now_v7();
    // Names come from the id, as for every project.
    let database_name = format!("capy_{}", id.simple());
    let (status, logical_replication) = match entry {
        Entry::Pool => ("pool", false),
        Entry::OnTheSpot {
            logical_replication,
        } => ("unclaimed", logical_replication),
    };
    let inserted = sqlx::query(
        "insert into projects (id, organization_id, cluster_id, name, slug, region, state,
             database_name, role_name, password_encrypted, max_connections, statement_timeout,
             idle_transaction_timeout, storage_limit_bytes, instant_status, logical_replication)
         select $1, null, c.id, $2, $2, c.region, 'provisioning', $3, $3, $4, $5, '60s', '60s',
                $6, $7, $8
         from clusters c where c.id = $9 and c.engine = 'postgresql'",
    )
    .bind(id)
    .bind(format!("instant-{}", &id.simple().to_string()[..12]))
    .bind(&database_name)
    .bind(secrets.seal(&crypto::generate_password()))
    .bind(limits.max_connections)
    .bind(limits.storage_limit_bytes)
    .bind(status)
    .bind(logical_replication)
    .bind(cluster_id)
    .execute(&mut *conn)
    .await?;
    // Not a PostgreSQL cluster (or gone): nothing recorded, nothing queued.
    if inserted.rows_affected() != 1 {
        return Err(sqlx::Error::RowNotFound);
    }
    let job = queue_job(
        &mut *conn,
        job_type::PROJECT_CREATE,
        id,
        cluster_id,
        limits.max_attempts,
    )
    .await?;
    sqlx::query("update projects set latest_job_id = $2 where id = $1")
        .bind(id)
        .bind(job.id)
        .execute(&mut *conn)
        .await?;
    Ok((id, job.id))
}

/// Who asks for an instant database.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    /// Its address, recorded for abuse investigations.
    pub address: &'a str,
    /// What its cap counts it under: an IPv4 address, an IPv6 /64.
    pub key: &'a str,
    /// A coarser block holding `key`: an IPv4 address, an IPv6 /48.
    pub site: &'a str,
}

/// Live unclaimed instant databases one client may hold at once.
#[derive(Debug, Clone, Copy)]
pub struct ClientCaps {
    /// Per client key (an IPv4 address, an IPv6 /64).
    pub per_key: i64,
    /// Per site, when it differs from the key (an IPv6 /48; an IPv4 address is its own
    /// site, and only `per_key` binds it).
    pub per_site: i64,
}

/// Live unclaimed instant databases a client may hold unless configured otherwise.
pub const DEFAULT_MAX_PER_CLIENT: i64 = 3;
/// ... and one IPv6 /48 (its 65,536 /64s together).
pub const DEFAULT_MAX_PER_IPV6_48: i64 = 10;

/// The rule of the client cap: unclaimed databases handed out and not expired yet.
/// The index `projects_instant_client` serves it (by `client_site`).
const LIVE_UNCLAIMED: &str =
    "instant_status = 'unclaimed' and deleted_at is null and expires_at > now()";

/// Whether a client may get another instant database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientRoom {
    /// Counted under the client's lock, held until the transaction ends.
    Free,
    /// Another request of the client's site holds its lock: nothing was counted. The
    /// caller ends the transaction (freeing its connection) before it tries again, so
    /// a client's concurrent requests never hold many connections waiting.
    Busy,
    /// At a cap: the seconds until its first database expires (a place frees then, or
    /// sooner when one is claimed).
    Full { retry_after_seconds: i64 },
}

/// Takes the lock of `client`'s site (until the transaction ends) if it is free, and
/// counts its live unclaimed databases against `caps`. Take it before any cluster's
/// lock: nothing takes them in the other order. Needs READ COMMITTED, as
/// [`create_within`].
pub async fn lock_client(
    conn: &mut PgConnection,
    client: &Client<'_>,
    caps: ClientCaps,
) -> sqlx::Result<ClientRoom> {
    let locked: bool = sqlx::query_scalar(
        "select pg_try_advisory_xact_lock(hashtextextended('capy:instant-client:' || $1, 0))",
    )
    .bind(client.site)
    .fetch_one(&mut *conn)
    .await?;
    if !locked {
        return Ok(ClientRoom::Busy);
    }
    // Seconds until the first expiry of the key's databases, and of the site's.
    let (by_key, key_wait, by_site, site_wait): (i64, Option<f64>, i64, Option<f64>) =
        sqlx::query_as(&format!(
            "select count(*) filter (where client_key = $2),
                    extract(epoch from min(expires_at) filter (where client_key = $2) - now())::float8,
                    count(*),
                    extract(epoch from min(expires_at) - now())::float8
             from projects where client_site = $1 and {LIVE_UNCLAIMED}"
        ))
        .bind(client.site)
        .bind(client.key)
        .fetch_one(conn)
        .await?;
    let wait = if by_key >= caps.per_key {
        key_wait
    } else if client.site != client.key && by_site >= caps.per_site {
        site_wait
    } else {
        return Ok(ClientRoom::Free);
    };
    Ok(ClientRoom::Full {
        retry_after_seconds: wait.map_or(1, |w| w.ceil().max(1.0) as i64),
    })
}

/// Takes the oldest ready pool entry of any cluster with one, for `client`; it expires
/// after `ttl_seconds`. Answers its id and cluster.
pub async fn take_from_pool(
    conn: &mut PgConnection,
    reference: &str,
    client: &Client<'_>,
    ttl_seconds: i64,
) -> sqlx::Result<Option<(Uuid, Uuid)>> {
    sqlx::query_as(
        "update projects set instant_status = 'unclaimed', instant_ref = $1, client_addr = $2,
             client_key = $4, client_site = $5,
             assigned_at = now(), expires_at = now() + make_interval(secs => $3),
             updated_at = now()
         where id = (select id from projects
                     where instant_status = 'pool' and deleted_at is null and state = 'ready'
                     order by created_at limit 1
                     for update skip locked)
         returning id, cluster_id",
    )
    .bind(reference)
    .bind(client.address)
    .bind(ttl_seconds as f64)
    .bind(client.key)
    .bind(client.site)
    .fetch_optional(conn)
    .await
}

/// Marks a database made on the spot as handed out to `client`.
pub async fn assign(
    conn: &mut PgConnection,
    id: Uuid,
    reference: &str,
    client: &Client<'_>,
    ttl_seconds: i64,
) -> sqlx::Result<()> {
    sqlx::query(
        "update projects set instant_ref = $2, client_addr = $3, client_key = $5,
             client_site = $6, assigned_at = now(),
             expires_at = now() + make_interval(secs => $4)
         where id = $1",
    )
    .bind(id)
    .bind(reference)
    .bind(client.address)
    .bind(ttl_seconds as f64)
    .bind(client.key)
    .bind(client.site)
    .execute(conn)
    .await?;
    Ok(())
}

/// Keeps `size` pool entries (provisioning or ready) on every cluster, within the
/// cluster's bound of instant databases. Answers how many were queued. Workers call it
/// on every maintenance tick; an advisory lock makes concurrent calls take turns.
pub async fn top_up(
    pool: &PgPool,
    secrets: &SecretBox,
    size: i64,
    limits: InstantLimits,
) -> sqlx::Result<usize> {
    let mut tx = pool.begin().await?;
    let got: bool = sqlx::query_scalar(
        "select pg_try_advisory_xact_lock(hashtextextended('capy:instant-pool', 0))",
    )
    .fetch_one(&mut *tx)
    .await?;
    if !got {
        return Ok(0);
    }
    // In the order project placement locks clusters, so the two never deadlock. Instant
    // databases are PostgreSQL's.
    let clusters: Vec<Uuid> = sqlx::query_scalar(
        "select id from clusters where engine = 'postgresql' order by created_at",
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut queued = 0;
    for cluster_id in clusters {
        queued += fill_cluster(&mut tx, secrets, cluster_id, size, limits).await?;
    }
    tx.commit().await?;
    Ok(queued)
}

/// Brings `cluster_id`'s pool up to `size` entries (provisioning or ready), within its
/// bound, counted under the cluster's lock; answers how many were queued. Filling *up
/// to* a size, never "one more per entry taken", keeps the pool at its size however
/// the API's refills and the workers' top-ups interleave.
pub async fn fill_cluster(
    conn: &mut PgConnection,
    secrets: &SecretBox,
    cluster_id: Uuid,
    size: i64,
    limits: InstantLimits,
) -> sqlx::Result<usize> {
    let held = lock_cluster(&mut *conn, cluster_id).await?;
    let missing = (size - held.pooled).min(limits.max_per_cluster - held.total);
    for _ in 0..missing.max(0) {
        create(&mut *conn, secrets, cluster_id, Entry::Pool, limits).await?;
    }
    Ok(usize::try_from(missing).unwrap_or(0))
}

/// Queues the deletion of unclaimed databases past their expiry, and of pool entries
/// whose provisioning failed (a new entry replaces them). Answers how many.
pub async fn expire(pool: &PgPool, max_attempts: i32, batch: i64) -> sqlx::Result<usize> {
    let mut tx = pool.begin().await?;
    let doomed: Vec<(Uuid, Uuid)> = sqlx::query_as(
        "update projects set state = 'deleting', updated_at = now()
         where id in (select id from projects
                      where deleted_at is null and state in ('ready', 'error', 'provisioning')
                        and ((instant_status = 'unclaimed' and expires_at < now())
                             or (instant_status = 'pool' and state = 'error'))
                      order by expires_at nulls first
                      limit $1
                      for update skip locked)
         returning id, cluster_id",
    )
    .bind(batch)
    .fetch_all(&mut *tx)
    .await?;
    for (id, cluster_id) in &doomed {
        let job = queue_job(
            &mut tx,
            job_type::PROJECT_DELETE,
            *id,
            *cluster_id,
            max_attempts,
        )
        .await?;
        sqlx::query("update projects set latest_job_id = $2 where id = $1")
            .bind(id)
            .bind(job.id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(doomed.len())
}

/// Queues `project.storage_check` jobs for unclaimed databases not checked in the last
/// `every_seconds`; answers how many.
pub async fn schedule_storage_checks(
    pool: &PgPool,
    every_seconds: f64,
    max_attempts: i32,
    batch: i64,
) -> sqlx::Result<usize> {
    let mut tx = pool.begin().await?;
    let due: Vec<(Uuid, Uuid)> = sqlx::query_as(
        "update projects set storage_checked_at = now()
         where id in (select id from projects
                      where instant_status = 'unclaimed' and deleted_at is null
                        and state = 'ready' and storage_limit_bytes is not null
                        and (storage_checked_at is null
                             or storage_checked_at < now() - make_interval(secs => $1))
                      order by storage_checked_at nulls first
                      limit $2
                      for update skip locked)
         returning id, cluster_id",
    )
    .bind(every_seconds)
    .bind(batch)
    .fetch_all(&mut *tx)
    .await?;
    for (id, cluster_id) in &due {
        queue_job(
            &mut tx,
            job_type::PROJECT_STORAGE_CHECK,
            *id,
            *cluster_id,
            max_attempts,
        )
        .await?;
    }
    tx.commit().await?;
    Ok(due.len())
}
