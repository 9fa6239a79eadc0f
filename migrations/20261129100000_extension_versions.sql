-- The flags of every version a cluster offers of an extension
-- (pg_available_extension_versions), read with the catalog (issue 10): whether a tenant
-- may enable a version depends on that version's `trusted` and `superuser`, not only on
-- the default version's. Expand-only: a new table; a catalog recorded before it has no
-- rows here until its next access check, and the API then falls back to
-- cluster_extensions.trusted.
create table cluster_extension_versions (
    cluster_id  uuid not null,
    name        text not null,
    version     text not null,
    trusted     boolean not null,
    superuser   boolean not null,
    primary key (cluster_id, name, version),
    foreign key (cluster_id, name) references cluster_extensions (cluster_id, name) on delete cascade
);
