-- capy's control-plane schema: who may ask (organizations, API keys), where databases
-- live (clusters), what was asked for (projects) and the work queue (jobs, attempts).

create table organizations (
    id          uuid primary key,
    name        text not null,
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now()
);

-- Keys are stored as SHA-256 of the plaintext: keys carry 256 bits of randomness, so a
-- fast hash is enough and lets the lookup be an index probe.
create table api_keys (
    id               uuid primary key,
    organization_id  uuid references organizations (id),
    is_admin         boolean not null default false,
    name             text not null,
    key_prefix       text not null,
    key_hash         bytea not null unique,
    project_id       uuid,
    scopes           text[] not null default '{read,write,credentials:read}',
    expires_at       timestamptz,
    revoked_at       timestamptz,
    last_used_at     timestamptz,
    created_at       timestamptz not null default now(),
    constraint api_keys_owner check (is_admin or organization_id is not null)
);

-- The admin URL holds the cluster's superuser password, so it is kept encrypted with
-- the control plane's secret key; only workers decrypt it.
create table clusters (
    id                  uuid primary key,
    name                text not null unique,
    region              text not null,
    admin_url_encrypted bytea not null,
    public_host         text not null,
    direct_port         integer not null,
    pooled_port         integer not null,
    ssl_mode            text not null default 'prefer',
    max_projects        integer,
    created_at          timestamptz not null default now(),
    updated_at          timestamptz not null default now()
);

create table projects (
    id                        uuid primary key,
    organization_id           uuid not null references organizations (id),
    cluster_id                uuid not null references clusters (id),
    name                      text not null,
    slug                      text not null,
    region                    text not null,
    environment               text not null default 'development',
    plan                      text not null default 'free',
    state                     text not null,
    database_name             text not null unique,
    role_name                 text not null unique,
    password_encrypted        bytea not null,
    max_connections           integer not null,
    statement_timeout         text not null,
    idle_transaction_timeout  text not null,
    storage_limit_bytes       bigint,
    last_error                text,
    latest_job_id             uuid,
    created_at                timestamptz not null default now(),
    updated_at                timestamptz not null default now(),
    deleted_at                timestamptz,
    constraint projects_state check (state in ('provisioning', 'ready', 'error', 'deleting', 'deleted'))
);

-- A name is unique among an organization's live projects.
create unique index projects_org_name on projects (organization_id, name) where deleted_at is null;
create index projects_org_created on projects (organization_id, created_at desc, id desc);

create table jobs (
    id                    uuid primary key,
    -- Submission order: locked_resource jobs run in this order.
    seq                   bigint generated always as identity,
    type                  text not null,
    state                 text not null default 'pending',
    organization_id       uuid references organizations (id),
    project_id            uuid references projects (id),
    cluster_id            uuid references clusters (id),
    preview_database_id   uuid,
    attempts              integer not null default 0,
    max_attempts          integer not null,
    run_at                timestamptz not null default now(),
    lease_expires_at      timestamptz,
    claimed_at            timestamptz,
    claimed_by            text,
    started_at            timestamptz,
    completed_at          timestamptz,
    error                 text,
    last_exit_code        integer,
    last_stdout           text,
    last_stderr           text,
    locked_resource       text,
    retry_classification  text,
    -- Set when a running job is cancelled: its worker stops the step and records the
    -- job as cancelled (or rescue does, if the worker is gone).
    cancel_requested_at   timestamptz,
    created_at            timestamptz not null default now(),
    updated_at            timestamptz not null default now(),
    constraint jobs_state check (state in ('pending', 'claimed', 'completed', 'failed', 'cancelled')),
    constraint jobs_retry_classification check (
        retry_classification in ('transient', 'permanent', 'timeout', 'worker_lost')),
    constraint jobs_attempts check (attempts >= 0 and max_attempts >= 1)
);

-- The claim reads pending jobs in run_at order; a partial index keeps that scan small
-- however many finished jobs the table holds.
create index jobs_claimable on jobs (run_at, seq) where state = 'pending';
-- The claimed jobs: few at any time (at most the fleet's slots), however long the
-- history. Recording outcomes joins them with a batch; rescue scans their leases.
create index jobs_claimed_lease on jobs (lease_expires_at) where state = 'claimed';
-- The per-resource serialisation check reads live jobs of one resource.
create index jobs_locked_resource on jobs (locked_resource, seq)
    where locked_resource is not null and state in ('pending', 'claimed');
-- The rule itself, as a backstop: at most one claimed job per resource.
create unique index jobs_one_claimed_per_resource on jobs (locked_resource)
    where locked_resource is not null and state = 'claimed';
-- Retention deletes finished jobs oldest first.
create index jobs_finished on jobs (completed_at) where state in ('completed', 'failed', 'cancelled');
-- Listing a project's or an organization's jobs. Partial, so internal jobs (no
-- project, no organization) cost these indexes nothing on every state change.
create index jobs_project on jobs (project_id, created_at desc) where project_id is not null;
create index jobs_org_created on jobs (organization_id, created_at desc, id desc)
    where organization_id is not null;

-- Jobs churn: every job is inserted, updated a few times and later deleted. Vacuum the
-- table after 2% of its rows change instead of the default 20%, so dead tuples do not
-- pile up in the hot partial indexes between runs.
alter table jobs set (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02);

-- One row per attempt, written when the attempt ends (while it runs, the job row
-- describes it). Keyed by (job, attempt): one index to maintain per insert.
create table job_attempts (
    job_id          uuid not null references jobs (id) on delete cascade,
    attempt         integer not null,
    worker          text not null,
    started_at      timestamptz not null,
    finished_at     timestamptz,
    exit_code       integer,
    classification  text,
    error           text,
    stdout          text not null default '',
    stderr          text not null default '',
    primary key (job_id, attempt),
    constraint job_attempts_classification check (
        classification in ('transient', 'permanent', 'timeout', 'worker_lost'))
);
