-- More engines (issue 16): a cluster runs PostgreSQL, MySQL (or MariaDB) or Redis, and
-- a project has its cluster's engine. A project can be stopped (its logins refused,
-- its data kept) and started again. Both columns default to what every existing row
-- is, so this only adds.
alter table clusters
    add column engine text not null default 'postgresql',
    add constraint clusters_engine check (engine in ('postgresql', 'mysql', 'redis'));

alter table projects
    add column engine text not null default 'postgresql',
    add constraint projects_engine check (engine in ('postgresql', 'mysql', 'redis'));

-- `stopped` joins the states; the wider check replaces the narrower one in one
-- statement (the table is small and this takes a moment's lock).
alter table projects
    drop constraint projects_state,
    add constraint projects_state
        check (state in ('provisioning', 'ready', 'stopped', 'error', 'deleting', 'deleted'));
