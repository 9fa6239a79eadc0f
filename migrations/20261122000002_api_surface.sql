-- The whole API (issue 4): job arguments, the extension catalogs, idempotency keys.
-- Expand-only: new columns have defaults, new tables stand alone.

-- What a job needs beyond its project and cluster, e.g. an extension's name and version.
alter table jobs add column args jsonb not null default '{}';

-- The extensions a cluster offers (pg_available_extensions), read when the cluster is
-- registered or its access checked. The API answers from here, so listing a project's
-- extensions never waits on the target cluster.
create table cluster_extensions (
    cluster_id       uuid not null references clusters (id) on delete cascade,
    name             text not null,
    description      text,
    default_version  text,
    trusted          boolean not null default false,
    refreshed_at     timestamptz not null default now(),
    primary key (cluster_id, name)
);

-- The extensions enabled in a project's database, as recorded when their enable job
-- completed (and removed when a disable job completed).
create table project_extensions (
    project_id  uuid not null references projects (id) on delete cascade,
    name        text not null,
    version     text,
    enabled_at  timestamptz not null default now(),
    primary key (project_id, name)
);

-- Clusters answer check-access with what they last reported.
alter table clusters add column last_checked_at timestamptz;

-- Idempotency-Key: the first answer to a POST, replayed for the same key and body. A
-- key is scoped to the caller (the SHA-256 of its credentials) so two callers never
-- share one. A row without a status is a request still running.
create table idempotency_keys (
    scope         bytea not null,
    key           text not null,
    request_hash  bytea not null,
    status        smallint,
    body          bytea,
    created_at    timestamptz not null default now(),
    primary key (scope, key)
);
create index idempotency_keys_created on idempotency_keys (created_at);

create index api_keys_org on api_keys (organization_id, id);

-- Lists page newest first by id (ids are UUIDv7, so id order is creation order); these
-- replace the (created_at, id) indexes, which nothing reads any more.
create index jobs_org_id on jobs (organization_id, id desc) where organization_id is not null;
create index jobs_project_id on jobs (project_id, id desc) where project_id is not null;
drop index jobs_org_created;
drop index jobs_project;
create index projects_org_id on projects (organization_id, id desc) where deleted_at is null;
drop index projects_org_created;
