-- Preview databases (issue 13): a short-lived copy of a project's database (`clone`:
-- schema and data; `empty`: schema only) with a login and a database of its own, on
-- the parent's cluster, deleted when `ttl_expires_at` passes. Its jobs carry
-- `jobs.preview_database_id` and are serialised with the parent's (`project:<id>`).
create table preview_databases (
    id                        uuid primary key,
    organization_id           uuid not null references organizations (id),
    project_id                uuid not null references projects (id),
    cluster_id                uuid not null references clusters (id),
    name                      text not null,
    mode                      text not null,
    state                     text not null default 'provisioning',
    database_name             text not null unique,
    role_name                 text not null unique,
    password_encrypted        bytea not null,
    max_connections           integer not null,
    statement_timeout         text not null,
    idle_transaction_timeout  text not null,
    storage_limit_bytes       bigint,
    -- What it was copied from: the parent project's database.
    source_kind               text not null default 'project',
    source_database           text not null,
    last_error                text,
    latest_job_id             uuid,
    ttl_expires_at            timestamptz not null,
    created_at                timestamptz not null default now(),
    updated_at                timestamptz not null default now(),
    deleted_at                timestamptz,
    constraint preview_databases_mode check (mode in ('clone', 'empty')),
    constraint preview_databases_state check
        (state in ('provisioning', 'ready', 'error', 'deleting', 'deleted')),
    constraint preview_databases_source_kind check (source_kind in ('project'))
);
-- A name is unique among a project's live previews.
create unique index preview_databases_project_name on preview_databases (project_id, name)
    where deleted_at is null;
create index preview_databases_project_created
    on preview_databases (project_id, created_at desc, id desc) where deleted_at is null;
-- The expiry sweep reads the live previews whose time has passed.
create index preview_databases_expiring on preview_databases (ttl_expires_at)
    where state in ('provisioning', 'ready', 'error');
-- A cluster's room counts its live previews.
create index preview_databases_cluster on preview_databases (cluster_id) where deleted_at is null;
