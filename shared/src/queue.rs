//! The job queue's SQL, all of it: enqueue, claim, heartbeat, finish and rescue.
//!
//! A claim is a committed lease: the claiming statement commits at once, and the worker
//! keeps the lease alive with heartbeats while the step runs. Every write a worker makes
//! afterwards is fenced on (`claimed_by`, `attempts`), so a worker whose lease was taken
//! over cannot overwrite the job's outcome or its attempt record.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng as _;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::model::{job_type, Job, JobState, RetryClassification, JOB_COLUMNS};

/// NOTIFY channel that wakes idle workers when a job is queued.
pub const NOTIFY_CHANNEL: &str = "capy_jobs";
/// NOTIFY channel carrying the id of a job cancelled while claimed, so its worker
/// stops the step at once (heartbeats catch it too, later).
pub const CANCEL_CHANNEL: &str = "capy_job_cancel";

/// NOTIFY channel announcing that jobs callers can see (of a project or an
/// organization) changed state: their ids, comma-separated. The API's `?wait=` answers
/// on it at once instead of at its next look.
pub const CHANGED_CHANNEL: &str = "capy_job_changed";
/// Ids per announcement: a NOTIFY payload holds under 8,000 bytes, an id 36 and a comma.
const IDS_PER_ANNOUNCEMENT: usize = 200;

/// The jobs of `jobs` whose changes are announced: those of a project or an
/// organization. Internal work, which only an operator sees, is left out, so a batch
/// of it costs nothing.
pub fn announced(jobs: &[Job]) -> Vec<Uuid> {
    jobs.iter()
        .filter(|job| job.organization_id.is_some() || job.project_id.is_some())
        .map(|job| job.id)
        .collect()
}

/// Announces on [`CHANGED_CHANNEL`] that the jobs `ids` changed state. Inside a
/// transaction the announcement goes out on commit.
pub async fn announce_changes(conn: impl sqlx::PgExecutor<'_>, ids: &[Uuid]) -> sqlx::Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let payloads: Vec<String> = ids
        .chunks(IDS_PER_ANNOUNCEMENT)
        .map(|chunk| {
            chunk
                .iter()
                .map(Uuid::to_string)
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    sqlx::query("select pg_notify($1, payload) from unnest($2::text[]) payload")
        .bind(CHANGED_CHANNEL)
        .bind(payloads)
        .execute(conn)
        .await?;
    Ok(())
}

/// A job to queue.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub job_type: String,
    pub organization_id: Option<Uuid>,
    pub project_id: Option<Uuid>,
    /// The preview database the job acts on (its project is the preview's parent).
    pub preview_database_id: Option<Uuid>,
    pub cluster_id: Option<Uuid>,
    /// Jobs with the same resource run one at a time, in submission order.
    pub locked_resource: Option<String>,
    pub max_attempts: i32,
    /// What the job needs beyond its project and cluster; `{}` when nothing.
    pub args: serde_json::Value,
    /// Not claimed before this moment; `None`: at once.
    pub run_at: Option<DateTime<Utc>>,
}

/// Queues a job inside the caller's transaction; idle workers are woken when it commits.
pub async fn enqueue(conn: &mut PgConnection, job: &NewJob) -> sqlx::Result<Job> {
    if let Some(resource) = &job.locked_resource {
        lock_resource(conn, resource).await?;
    }
    let sql = format!(
        "insert into jobs (id, type, organization_id, project_id, cluster_id, locked_resource, max_attempts, args,
                           run_at, preview_database_id)
         select $1, $2, $3, $4, $5, $6, $7, $8, coalesce($9, now()), $10
         -- The wake-up rides with the insert: one round trip fewer per job queued.
         from (select pg_notify($11, '')) as wake
         returning {JOB_COLUMNS}"
    );
    let inserted: Job = sqlx::query_as(&sql)
        .bind(Uuid::now_v7())
        .bind(&job.job_type)
        .bind(job.organization_id)
        .bind(job.project_id)
        .bind(job.cluster_id)
        .bind(&job.locked_resource)
        .bind(job.max_attempts)
        .bind(&job.args)
        .bind(job.run_at)
        .bind(job.preview_database_id)
        .bind(NOTIFY_CHANNEL)
        .fetch_one(&mut *conn)
        .await?;
    Ok(inserted)
}

/// Queues many jobs in one statement inside the caller's transaction (their columns as
/// arrays, unnested in order, so `seq` follows the slice's order), and wakes idle
/// workers once when it commits; answers the new jobs' ids in that order. The
/// resources the jobs name are locked first, as [`enqueue`] does, in one statement and
/// sorted, so two bulk enqueues of overlapping resources cannot deadlock.
pub async fn enqueue_many(conn: &mut PgConnection, jobs: &[NewJob]) -> sqlx::Result<Vec<Uuid>> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let mut resources: Vec<&str> = jobs
        .iter()
        .filter_map(|job| job.locked_resource.as_deref())
        .collect();
    resources.sort_unstable();
    resources.dedup();
    if !resources.is_empty() {
        sqlx::query(
            "select count(pg_advisory_xact_lock(hashtextextended(r, 0)))
             from (select r from unnest($1::text[]) r order by r) s",
        )
        .bind(&resources)
        .execute(&mut *conn)
        .await?;
    }
    let ids: Vec<Uuid> = jobs.iter().map(|_| Uuid::now_v7()).collect();
    let column = |f: fn(&NewJob) -> Option<Uuid>| jobs.iter().map(f).collect::<Vec<_>>();
    sqlx::query(
        "insert into jobs (id, type, organization_id, project_id, cluster_id, locked_resource,
                           max_attempts, args, run_at, preview_database_id)
         select id, type, organization_id, project_id, cluster_id, locked_resource,
                max_attempts, args, coalesce(run_at, now()), preview_database_id
         from unnest($1::uuid[], $2::text[], $3::uuid[], $4::uuid[], $5::uuid[], $6::text[],
                     $7::int4[], $8::jsonb[], $9::timestamptz[], $10::uuid[])
              with ordinality as t(id, type, organization_id, project_id, cluster_id,
                                   locked_resource, max_attempts, args, run_at,
                                   preview_database_id, n)
         order by n",
    )
    .bind(&ids)
    .bind(jobs.iter().map(|j| j.job_type.as_str()).collect::<Vec<_>>())
    .bind(column(|j| j.organization_id))
    .bind(column(|j| j.project_id))
    .bind(column(|j| j.cluster_id))
    .bind(
        jobs.iter()
            .map(|j| j.locked_resource.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(jobs.iter().map(|j| j.max_attempts).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| &j.args).collect::<Vec<_>>())
    .bind(jobs.iter().map(|j| j.run_at).collect::<Vec<_>>())
    .bind(column(|j| j.preview_database_id))
    .execute(&mut *conn)
    .await?;
    wake_workers(&mut *conn).await?;
    Ok(ids)
}

/// Wakes idle workers (LISTEN) when the caller's transaction commits.
async fn wake_workers(conn: &mut PgConnection) -> sqlx::Result<()> {
    sqlx::query("select pg_notify($1, '')")
        .bind(NOTIFY_CHANNEL)
        .execute(conn)
        .await?;
    Ok(())
}

/// Serialises the transactions that queue jobs of `resource` until they end, so the
/// resource's jobs become visible in `seq` order: a claim never sees a later job of a
/// resource without the earlier ones.
async fn lock_resource(conn: &mut PgConnection, resource: &str) -> sqlx::Result<()> {
    sqlx::query("select pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(resource)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Where a claim's walk of the pending jobs' index (`jobs_claimable`, by `run_at`,
/// `seq`) starts. Every claimed job leaves a dead entry at the front of that index
/// until vacuum removes it, and a claim from the front steps over all of them: millions
/// under a sustained load, at every claim. A floor at or below the smallest pending
/// key skips them; a job that commits later with a key below the floor (its
/// transaction began well before the floor was taken, or it names a past `run_at`) is
/// found by the next [`claim_floor`], which walks from the front: it waits for that,
/// never longer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimKey {
    pub run_at: DateTime<Utc>,
    pub seq: i64,
}

/// How far below now a floor goes at most: jobs queued by transactions that began
/// this long before the floor was taken (their `run_at` is when they began) are above
/// it, and a job scheduled for later does not hold the floor above the jobs queued
/// meanwhile. A bulk enqueue keeps its transaction open for a second or more (100,000
/// jobs on 2 cores): with 250 ms its jobs waited for the next floor, and the burn-down
/// lost a quarter of its rate. The price is a walk over the dead entries of the last
/// few seconds of claims.
const CLAIM_FLOOR_SLACK_MS: i64 = 5_000;

/// The floor for the claims that follow ([`ClaimKey`]): the smallest pending job's key,
/// or [`CLAIM_FLOOR_SLACK_MS`] before now if that is lower (or nothing is pending).
pub async fn claim_floor(conn: impl sqlx::PgExecutor<'_>) -> sqlx::Result<ClaimKey> {
    let (run_at, seq) = sqlx::query_as(
        "select case when p.run_at < f.at then p.run_at else f.at end,
                case when p.run_at < f.at then p.seq else 0 end
         from (select now() - $1 * interval '1 millisecond' as at) f
         left join lateral (select run_at, seq from jobs where state = 'pending'
                            order by run_at, seq limit 1) p on true",
    )
    .bind(CLAIM_FLOOR_SLACK_MS)
    .fetch_one(conn)
    .await?;
    Ok(ClaimKey { run_at, seq })
}

/// Claims up to `limit` runnable jobs for `worker` in one statement, looking only at
/// pending jobs whose key is at or above `floor` (all of them when `None`). Workers
/// run it on a [`crate::db::queue_pool`] connection, so its cached plan stays a TID
/// scan. (The attempt's record is written when it ends; while it runs, the job's
/// `claimed_by`, `claimed_at` and `attempts` describe it.)
///
/// A job with a `locked_resource` is runnable only when no other job of that resource
/// is claimed and none submitted before it is still pending, which serialises a
/// resource's jobs in submission order without holding up other resources (the floor
/// does not enter that check).
pub async fn claim(
    conn: impl sqlx::PgExecutor<'_>,
    worker: &str,
    limit: i64,
    lease: Duration,
    floor: Option<ClaimKey>,
) -> sqlx::Result<Vec<Job>> {
    let sql = format!(
        "with candidates as (
             select j.ctid from jobs j
             where j.state = 'pending' and j.run_at <= now()
               and (j.run_at, j.seq) >= (coalesce($4, '-infinity'::timestamptz),
                                         coalesce($5, 0::int8))
               and (j.locked_resource is null or not exists (
                     select 1 from jobs o
                     where o.locked_resource = j.locked_resource and o.id <> j.id
                       and (o.state = 'claimed' or (o.state = 'pending' and o.seq < j.seq))))
             order by j.run_at, j.seq
             limit $2
             for update of j skip locked
         )
         -- clock_timestamp(), not now(): the transaction may start a moment before the
         -- statement's snapshot, and an attempt must not seem to start before the one it
         -- waited for (same resource) ended.
         update jobs set state = 'claimed', claimed_by = $1, claimed_at = clock_timestamp(),
                started_at = coalesce(started_at, clock_timestamp()), attempts = attempts + 1,
                lease_expires_at = now() + $3 * interval '1 millisecond', updated_at = now()
         -- The rows just locked, by their physical address: a TID scan whatever the
         -- statistics say (a join here may be planned as a scan of the table).
         where jobs.ctid = any(array(select ctid from candidates))
         returning {JOB_COLUMNS}"
    );
    let mut jobs: Vec<Job> = sqlx::query_as(&sql)
        .bind(worker)
        .bind(limit)
        .bind(millis(lease))
        .bind(floor.map(|key| key.run_at))
        .bind(floor.map(|key| key.seq))
        .fetch_all(conn)
        .await?;
    // Started oldest first; sorted here rather than by the statement, which would
    // have to hold every claimed row once more to sort it.
    jobs.sort_by_key(|job| job.run_at);
    Ok(jobs)
}

/// Extends the leases `worker` holds on attempt `attempts[i]` of job `job_ids[i]`;
/// answers the ids it still holds, each with whether a cancel was asked of it. A job
/// missing from the answer was taken over (maybe re-claimed as a later attempt): that
/// step must stop.
pub async fn heartbeat(
    conn: impl sqlx::PgExecutor<'_>,
    worker: &str,
    job_ids: &[Uuid],
    attempts: &[i32],
    lease: Duration,
) -> sqlx::Result<Vec<(Uuid, bool)>> {
    sqlx::query_as(
        "update jobs j set lease_expires_at = now() + $4 * interval '1 millisecond'
         from unnest($2::uuid[], $3::int[]) as held(id, attempt)
         where j.id = held.id and j.attempts = held.attempt
           and j.claimed_by = $1 and j.state = 'claimed'
         returning j.id, j.cancel_requested_at is not null",
    )
    .bind(worker)
    .bind(job_ids)
    .bind(attempts)
    .bind(millis(lease))
    .fetch_all(conn)
    .await
}

/// How failed attempts are spaced: exponential backoff with jitter.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base_delay: Duration::from_secs(2),
            max_delay: Duration::from_secs(600),
        }
    }
}

impl RetryPolicy {
    /// The delay before attempt `attempt + 1`: base × 2^(attempt−1), capped, then
    /// scaled by a random factor in [0.5, 1] so retries of many jobs spread out.
    pub fn delay_after(&self, attempt: i32) -> Duration {
        let exponent = attempt.saturating_sub(1).clamp(0, 30) as u32;
        let full = self
            .base_delay
            .saturating_mul(1u32 << exponent)
            .min(self.max_delay);
        full.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
    }
}

/// How an attempt ended, as the worker observed it.
#[derive(Debug, Clone)]
pub struct AttemptOutcome {
    /// The step was stopped because the job was cancelled: the job ends `cancelled`.
    pub cancelled: bool,
    pub exit_code: Option<i32>,
    /// `None` when the attempt succeeded.
    pub classification: Option<RetryClassification>,
    pub error: Option<String>,
    pub stdout: String,
    pub stderr: String,
}

/// The end of one attempt, to record.
#[derive(Debug, Clone)]
pub struct FinishedAttempt {
    pub job_id: Uuid,
    pub attempt: i32,
    pub outcome: AttemptOutcome,
    /// Used when the outcome is a retryable failure and attempts remain.
    pub retry_delay: Duration,
}

impl FinishedAttempt {
    /// The successful end of `job`'s current attempt, with no output: work done inside
    /// the worker (no-ops, sweeps).
    pub fn succeeded(job: &Job) -> Self {
        Self {
            job_id: job.id,
            attempt: job.attempts,
            outcome: AttemptOutcome {
                cancelled: false,
                exit_code: Some(0),
                classification: None,
                error: None,
                stdout: String::new(),
                stderr: String::new(),
            },
            retry_delay: Duration::ZERO,
        }
    }
}

/// Records the end of attempts by `worker`, many in one statement: each job moves to
/// `completed`, back to `pending` (retried after its delay) or to `failed`. An attempt
/// that did not complete is written to `job_attempts`; a completed one stays in its
/// job's row, which no later attempt overwrites (`job_attempt_history` reads both).
///
/// A cancel asked while the attempt ran wins over its retryable failure (transient,
/// timeout): the job ends `cancelled` instead of going back to `pending`; the attempt
/// is still recorded with its real classification.
///
/// Fenced: an attempt whose job `worker` no longer holds (lease lost, job cancelled)
/// writes nothing. Answers the jobs that were updated. Runs in an [`Outcomes`]
/// transaction, whose planner settings it needs.
async fn finish(
    conn: &mut PgConnection,
    worker: &str,
    attempts: &[FinishedAttempt],
) -> sqlx::Result<Vec<Job>> {
    let mut ids = Vec::with_capacity(attempts.len());
    let mut numbers = Vec::with_capacity(attempts.len());
    let mut states = Vec::with_capacity(attempts.len());
    let mut classes = Vec::with_capacity(attempts.len());
    let mut errors = Vec::with_capacity(attempts.len());
    let mut exit_codes = Vec::with_capacity(attempts.len());
    let mut stdouts = Vec::with_capacity(attempts.len());
    let mut stderrs = Vec::with_capacity(attempts.len());
    let mut delays = Vec::with_capacity(attempts.len());
    for finished in attempts {
        let outcome = &finished.outcome;
        // The job's next state, or `retry` (not a state: the statement decides between
        // pending, failed and cancelled).
        let (state, class) = match outcome.classification {
            None if outcome.cancelled => (JobState::Cancelled.as_str(), None),
            None => (JobState::Completed.as_str(), None),
            Some(class) if class.is_retryable() => ("retry", Some(class.as_str())),
            Some(class) => (JobState::Failed.as_str(), Some(class.as_str())),
        };
        ids.push(finished.job_id);
        numbers.push(finished.attempt);
        states.push(state);
        classes.push(class);
        errors.push(outcome.error.as_deref());
        exit_codes.push(outcome.exit_code);
        stdouts.push(outcome.stdout.as_str());
        stderrs.push(outcome.stderr.as_str());
        delays.push(millis(finished.retry_delay));
    }
    let sql = format!(
        "with input as materialized (
             -- `held`: the state each job must still be in (claimed). Compared as a
             -- join column, it does not make the claimed jobs' partial index a way
             -- to the rows, as a constant would.
             select t.*, 'claimed'::text as held
             from unnest($2::uuid[], $3::int[], $4::text[], $5::text[], $6::text[],
                         $7::int[], $8::text[], $9::text[], $10::bigint[])
                 as t(id, attempt, outcome, class, error, exit_code, stdout, stderr, delay_ms)
         ), updated as (
             update jobs j set
                 state = case when i.outcome <> 'retry' then i.outcome
                              when j.cancel_requested_at is not null then 'cancelled'
                              when j.attempts < j.max_attempts then 'pending'
                              else 'failed' end,
                 run_at = case when i.outcome = 'retry'
                              then now() + i.delay_ms * interval '1 millisecond' else j.run_at end,
                 completed_at = case when i.outcome = 'retry' and j.attempts < j.max_attempts
                                          and j.cancel_requested_at is null
                                     then null else now() end,
                 lease_expires_at = null,
                 retry_classification = i.class,
                 error = case when i.outcome = 'retry' and j.cancel_requested_at is not null
                              then 'cancelled by request; the last attempt failed: ' || coalesce(i.error, '?')
                              else i.error end,
                 last_exit_code = i.exit_code,
                 last_stdout = i.stdout,
                 last_stderr = i.stderr,
                 updated_at = now()
             from input i
             -- The batch's rows through the primary key, hashed against the batch:
             -- never a walk of the claimed jobs' index, which holds an entry for every
             -- claim since the last vacuum. Not by their physical address: a row that
             -- the job's heartbeat (or a cancel request) moves while this waits for
             -- it is then rechecked at its new address, which no list read before
             -- could name, and the outcome was dropped as if the lease were lost.
             where j.id = any($2::uuid[])
               and j.id = i.id and j.state = i.held and j.claimed_by = $1
               and j.attempts = i.attempt
             returning j.*
         ), recorded as (
             insert into job_attempts (job_id, attempt, worker, started_at, finished_at,
                                       exit_code, classification, error, stdout, stderr)
             select u.id, u.attempts, u.claimed_by, u.claimed_at, now(),
                    i.exit_code, i.class, i.error, i.stdout, i.stderr
             from updated u join input i on i.id = u.id and i.attempt = u.attempts
             -- A completed attempt stays described by its job's row (the view
             -- job_attempt_history shows it): one tuple, index entry and row lock fewer.
             where u.state <> 'completed'
         )
         select {JOB_COLUMNS} from updated"
    );
    sqlx::query_as(&sql)
        .bind(worker)
        .bind(ids)
        .bind(numbers)
        .bind(states)
        .bind(classes)
        .bind(errors)
        .bind(exit_codes)
        .bind(stdouts)
        .bind(stderrs)
        .bind(delays)
        .fetch_all(&mut *conn)
        .await
}

/// The transaction that records outcomes ([`Outcomes::finish`]), then what they do to
/// their projects ([`Outcomes::planner_back`]).
///
/// The right plan for `finish` looks the batch's ids up in the primary key and hashes
/// those rows against the batch: work in proportion to the batch, however long the
/// history and however many claims since the last vacuum. A queue's statistics are always stale (what was pending a moment ago is claimed now),
/// and have led the planner to loop over every claimed row for each outcome, to walk
/// the claimed jobs' index (dead entries included) for each batch, or to scan the whole
/// table. So the transaction begins with nested loops, merge joins and sequential
/// scans switched off, in the message that begins it (one round trip for both: at
/// low rates an outcome is a transaction of its own), and switches them back before
/// anything else is planned in it.
pub struct Outcomes(sqlx::Transaction<'static, sqlx::Postgres>);

impl Outcomes {
    pub async fn begin(pool: &PgPool) -> sqlx::Result<Self> {
        let begin = "begin; set local enable_nestloop = off; set local enable_mergejoin = off;
                     set local enable_seqscan = off";
        Ok(Self(pool.begin_with(begin).await?))
    }

    /// Records `attempts` by `worker` (see [`finish`]); answers the jobs updated.
    pub async fn finish(
        &mut self,
        worker: &str,
        attempts: &[FinishedAttempt],
    ) -> sqlx::Result<Vec<Job>> {
        finish(&mut self.0, worker, attempts).await
    }

    /// The planner as the session has it (the switches go back to the values the
    /// session started with; capy's sessions never change them), for the statements
    /// that follow in the transaction.
    pub async fn planner_back(
        mut self,
    ) -> sqlx::Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        // A string without arguments goes as one simple query: three statements, one
        // round trip.
        sqlx::Executor::execute(
            &mut *self.0,
            "set local enable_nestloop to default; set local enable_mergejoin to default;
             set local enable_seqscan to default",
        )
        .await?;
        Ok(self.0)
    }

    /// Commits the outcomes, when nothing else was to be done in their transaction.
    pub async fn commit(self) -> sqlx::Result<()> {
        self.0.commit().await
    }
}

/// Hands a claimed job back without spending an attempt (the worker is shutting
/// down): it is pending again at once, and no attempt is recorded.
/// Answers whether the job was still ours.
pub async fn release(
    pool: &PgPool,
    job_id: Uuid,
    attempt: i32,
    worker: &str,
) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    let released = sqlx::query(
        "update jobs set
                state = case when cancel_requested_at is null then 'pending' else 'cancelled' end,
                completed_at = case when cancel_requested_at is null then null else now() end,
                attempts = attempts - 1, run_at = now(), lease_expires_at = null, updated_at = now()
         where id = $1 and state = 'claimed' and claimed_by = $3 and attempts = $2",
    )
    .bind(job_id)
    .bind(attempt)
    .bind(worker)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if released {
        wake_workers(&mut tx).await?;
    }
    tx.commit().await?;
    Ok(released)
}

/// Takes back jobs whose lease expired (their worker died or lost the database): the
/// attempt is recorded as `worker_lost` and the job retried, or failed when out of
/// attempts. Answers the jobs it moved.
pub async fn rescue_expired(
    conn: &mut PgConnection,
    retry: &RetryPolicy,
    limit: i64,
) -> sqlx::Result<Vec<Job>> {
    let sql = format!(
        "with lost as (
             select id from jobs
             where state = 'claimed' and lease_expires_at < now()
             order by lease_expires_at
             limit $1
             for update skip locked
         ), moved as (
             update jobs set
                 state = case when cancel_requested_at is not null then 'cancelled'
                              when attempts < max_attempts then 'pending' else 'failed' end,
                 run_at = now() + $2 * interval '1 millisecond',
                 completed_at = case when cancel_requested_at is null and attempts < max_attempts
                                     then null else now() end,
                 lease_expires_at = null,
                 retry_classification = 'worker_lost',
                 error = 'worker ' || coalesce(claimed_by, '?') || ' was lost (its lease expired)',
                 updated_at = now()
             from lost where jobs.id = lost.id
             returning jobs.*
         ), recorded as (
             insert into job_attempts (job_id, attempt, worker, started_at, finished_at,
                                       classification, error)
             select id, attempts, coalesce(claimed_by, '?'), coalesce(claimed_at, now()), now(),
                    'worker_lost', error
             from moved
         )
         select {JOB_COLUMNS} from moved"
    );
    sqlx::query_as(&sql)
        .bind(limit)
        .bind(millis(retry.delay_after(1)))
        .fetch_all(&mut *conn)
        .await
}

/// What a cancel or retry request found.
#[derive(Debug)]
pub enum Transition {
    /// The job moved; here it is as it is now.
    Done(Job),
    /// The job is in a state the request does not apply to.
    Refused(Job),
    /// The job's project is deleted or being deleted: only its delete may run again.
    ProjectGone(Job),
    NotFound,
}

/// Cancels a job. A pending job is cancelled at once. A claimed job stays claimed
/// (its resource stays held) until its step has stopped: its worker, told by NOTIFY or
/// at its next heartbeat, stops the step and records the job `cancelled`; if that
/// worker is gone, rescue does.
pub async fn cancel(conn: &mut PgConnection, job_id: Uuid) -> sqlx::Result<Transition> {
    let Some(job) = lock_job(conn, job_id).await? else {
        return Ok(Transition::NotFound);
    };
    if job.state == JobState::Claimed && job.cancel_requested_at.is_none() {
        sqlx::query("select pg_notify($1, $2)")
            .bind(CANCEL_CHANNEL)
            .bind(job_id.to_string())
            .execute(&mut *conn)
            .await?;
        let sql = format!(
            "update jobs set cancel_requested_at = now(), updated_at = now()
             where id = $1 returning {JOB_COLUMNS}"
        );
        let job = sqlx::query_as(&sql)
            .bind(job_id)
            .fetch_one(&mut *conn)
            .await?;
        return Ok(Transition::Done(job));
    }
    if job.state != JobState::Pending {
        return Ok(Transition::Refused(job));
    }
    let sql = format!(
        "update jobs set state = 'cancelled', completed_at = now(), lease_expires_at = null,
                error = 'cancelled by request', updated_at = now()
         where id = $1 returning {JOB_COLUMNS}"
    );
    let job = sqlx::query_as(&sql)
        .bind(job_id)
        .fetch_one(&mut *conn)
        .await?;
    Ok(Transition::Done(job))
}

/// Queues a failed or cancelled job again, with `extra_attempts` more attempts.
///
/// A deleted project stays deleted: no job of a project that is deleted or being
/// deleted runs again, except its `project.delete`.
pub async fn retry(
    conn: &mut PgConnection,
    job_id: Uuid,
    extra_attempts: i32,
) -> sqlx::Result<Transition> {
    let Some(job) = lock_job(conn, job_id).await? else {
        return Ok(Transition::NotFound);
    };
    if !matches!(job.state, JobState::Failed | JobState::Cancelled) {
        return Ok(Transition::Refused(job));
    }
    if !job_type::runs_for_deleted_project(&job.job_type)
        && (project_is_gone(conn, job.project_id).await?
            || preview_is_gone(conn, job.preview_database_id).await?)
    {
        return Ok(Transition::ProjectGone(job));
    }
    if let Some(resource) = &job.locked_resource {
        lock_resource(conn, resource).await?;
    }
    // A new seq: the retried job queues behind its resource's later jobs, which may
    // already be running, instead of jumping ahead of them.
    let sql = format!(
        "update jobs set state = 'pending', run_at = now(), completed_at = null, seq = default,
                cancel_requested_at = null,
                max_attempts = attempts + $2, error = null, retry_classification = null,
                updated_at = now()
         where id = $1 returning {JOB_COLUMNS}"
    );
    let job = sqlx::query_as(&sql)
        .bind(job_id)
        .bind(extra_attempts)
        .fetch_one(&mut *conn)
        .await?;
    wake_workers(&mut *conn).await?;
    Ok(Transition::Done(job))
}

/// Whether project `id` is deleted or being deleted. Its row stays share-locked until
/// the transaction ends, so a delete queued meanwhile waits for it (and the retried
/// job, if any, is then refused by the worker: see `PROJECT_IS_LIVE`).
async fn project_is_gone(conn: &mut PgConnection, id: Option<Uuid>) -> sqlx::Result<bool> {
    let Some(id) = id else {
        return Ok(false);
    };
    let live: Option<bool> = sqlx::query_scalar(&format!(
        "select {PROJECT_IS_LIVE} from projects where id = $1 for share"
    ))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(live != Some(true))
}

/// Whether preview `id` is deleted or being deleted (its row share-locked, as
/// [`project_is_gone`] does): only its delete may run again.
async fn preview_is_gone(conn: &mut PgConnection, id: Option<Uuid>) -> sqlx::Result<bool> {
    let Some(id) = id else {
        return Ok(false);
    };
    let live: Option<bool> = sqlx::query_scalar(
        "select state not in ('deleting', 'deleted') and deleted_at is null
         from preview_databases where id = $1 for share",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(live != Some(true))
}

/// How the error of a job refused because its project is deleted or being deleted
/// begins (the worker writes it; outcomes recognise it).
pub const PROJECT_GONE_ERROR: &str = "the project is deleted or being deleted";

/// The condition (on `projects`) under which a project's jobs other than its delete
/// may run: it is neither deleted nor being deleted. The API's retry and the worker's
/// step input both read it.
pub const PROJECT_IS_LIVE: &str = "(state not in ('deleting', 'deleted') and deleted_at is null)";

async fn lock_job(conn: &mut PgConnection, job_id: Uuid) -> sqlx::Result<Option<Job>> {
    sqlx::query_as(&format!(
        "select {JOB_COLUMNS} from jobs where id = $1 for update"
    ))
    .bind(job_id)
    .fetch_optional(&mut *conn)
    .await
}

/// Deletes up to `batch` finished jobs older than `older_than`; answers how many.
pub async fn delete_finished_before(
    pool: &PgPool,
    older_than: DateTime<Utc>,
    batch: i64,
) -> sqlx::Result<u64> {
    let done = sqlx::query(
        "delete from jobs where id in (
             select id from jobs
             where state in ('completed', 'failed', 'cancelled') and completed_at < $1
             limit $2
             for update skip locked)",
    )
    .bind(older_than)
    .bind(batch)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// The queue's depth: runnable pending jobs, and how long the oldest has waited (in
/// seconds; 0 when none). Reads the claim's own partial index.
pub async fn depth(pool: &PgPool) -> sqlx::Result<(i64, f64)> {
    sqlx::query_as(
        "select count(*), coalesce(extract(epoch from now() - min(run_at)), 0)::float8
         from jobs where state = 'pending' and run_at <= now()",
    )
    .fetch_one(pool)
    .await
}

/// How many jobs of each type are in each state: `(type, state, count)`.
pub async fn counts_by_type_and_state(pool: &PgPool) -> sqlx::Result<Vec<(String, String, i64)>> {
    sqlx::query_as("select type, state, count(*) from jobs group by type, state")
        .fetch_all(pool)
        .await
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = RetryPolicy {
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(10),
        };
        let first = policy.delay_after(1);
        assert!(first >= Duration::from_millis(500) && first <= Duration::from_secs(1));
        let third = policy.delay_after(3);
        assert!(third >= Duration::from_secs(2) && third <= Duration::from_secs(4));
        assert!(policy.delay_after(40) <= Duration::from_secs(10));
    }
}
