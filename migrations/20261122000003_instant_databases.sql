-- Instant databases (issue 6): a project nobody owns yet. Workers keep a warm pool of
-- them per cluster ('pool'); a POST takes one ('unclaimed', expiring); an
-- organization's key claims it ('claimed', an ordinary project from then on).
-- Expand-only: organization_id becomes optional for these projects alone.
alter table projects alter column organization_id drop not null;
alter table projects
    add column instant_status       text,
    add column instant_ref          text,
    add column expires_at           timestamptz,
    add column claimed_at           timestamptz,
    add column assigned_at          timestamptz,
    add column logical_replication  boolean not null default false,
    -- When the storage limit was last checked (unclaimed databases only).
    add column storage_checked_at   timestamptz,
    -- Who asked, for abuse investigations (the rate limit itself is in the API).
    add column client_addr          text;
alter table projects add constraint projects_instant_status
    check (instant_status in ('pool', 'unclaimed', 'claimed'));
alter table projects add constraint projects_owner
    check (organization_id is not null or instant_status in ('pool', 'unclaimed'));

-- Taking from the pool reads a cluster's ready pool entries, oldest first.
create index projects_instant_pool on projects (cluster_id, created_at)
    where instant_status = 'pool' and deleted_at is null;
-- Expiry reads unclaimed databases by expiry.
create index projects_instant_expiry on projects (expires_at)
    where instant_status = 'unclaimed' and deleted_at is null;

-- What the last access check read of the cluster's wal_level: logical replication
-- needs 'logical'.
alter table clusters add column wal_level text;
