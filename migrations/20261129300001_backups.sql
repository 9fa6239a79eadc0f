-- Backups, exports and restores (issue 12), and the queue's periodic jobs.
--
-- backups: one row per archive (`pg_dump -Fc`) in the backup store, kind `backup`
-- (verified by a test restore, kept for `retention_days` when scheduled) or `export`
-- (downloadable until `expires_at`). The row is written with its job; the archive
-- counts only once the job completed (`state = 'completed'`): an upload cut short is
-- never a backup. `backup_key` is the object's key under the store's prefix.
create table backups (
    id                   uuid primary key,
    organization_id      uuid not null references organizations (id),
    project_id           uuid not null references projects (id),
    kind                 text not null,
    backup_key           text not null unique,
    label                text,
    database_name        text not null,
    state                text not null default 'pending',
    size_bytes           bigint,
    sha256               text,
    -- What the step recorded at dump time: tables with their row counts (the
    -- verification compares them), extensions, the server's version.
    manifest             jsonb,
    verification_state   text not null default 'pending',
    verification_error   text,
    verified_at          timestamptz,
    -- The schedule (periodic job) that made it, and how long it is kept.
    schedule_name        text,
    retention_days       integer,
    expires_at           timestamptz,
    job_id               uuid,
    error                text,
    created_at           timestamptz not null default now(),
    updated_at           timestamptz not null default now(),
    completed_at         timestamptz,
    deleted_at           timestamptz,
    constraint backups_kind check (kind in ('backup', 'export')),
    constraint backups_state check (state in ('pending', 'completed', 'failed', 'deleting', 'deleted')),
    constraint backups_verification_state check
        (verification_state in ('pending', 'verified', 'failed', 'skipped'))
);
create index backups_project_created on backups (project_id, created_at desc, id desc)
    where deleted_at is null;
create index backups_expiring on backups (expires_at) where state in ('completed', 'failed');

-- Single-use approvals for dangerous actions (`project.restore_overwrite`): the token
-- is shown once; only its SHA-256 is kept. `job_id` is the job it authorized.
create table approvals (
    id               uuid primary key,
    organization_id  uuid not null references organizations (id),
    project_id       uuid not null references projects (id),
    action           text not null,
    token_hash       bytea not null unique,
    expires_at       timestamptz not null,
    used_at          timestamptz,
    job_id           uuid,
    created_at       timestamptz not null default now()
);

-- The queue's periodic jobs: each row queues its job when `next_run_at` passes, then
-- moves `next_run_at` to the next slot after now, in one transaction, so however many
-- workers look, a slot queues one job, and a slot missed while no worker ran is not
-- made up (the next one after now is). Daily at `minute_of_day` (UTC) or every
-- `every_seconds`.
create table periodic_jobs (
    name             text primary key,
    job_type         text not null,
    organization_id  uuid references organizations (id),
    project_id       uuid references projects (id),
    cluster_id       uuid references clusters (id),
    args             jsonb not null default '{}',
    minute_of_day    integer,
    every_seconds    integer,
    is_active        boolean not null default true,
    next_run_at      timestamptz not null,
    last_run_at      timestamptz,
    last_job_id      uuid,
    created_at       timestamptz not null default now(),
    updated_at       timestamptz not null default now(),
    constraint periodic_jobs_schedule check
        ((minute_of_day is null) <> (every_seconds is null)
         and (minute_of_day is null or minute_of_day between 0 and 1439)
         and (every_seconds is null or every_seconds > 0))
);
create index periodic_jobs_due on periodic_jobs (next_run_at) where is_active;
