-- Whether the last access check found physical replication open to roles other than
-- the admin in pg_hba.conf (issue 10): a role with REPLICATION could then stream the
-- whole cluster's WAL. Null: not read (never checked, or the admin may not read
-- pg_hba_file_rules). Instant databases with logical replication go only to clusters
-- where it is false.
alter table clusters add column physical_replication_open boolean;
