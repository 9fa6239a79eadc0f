-- The cluster's pooler (PgBouncer in transaction mode). `pooled_host` is where clients
-- reach it (null: the cluster's public_host, at pooled_port). `pooler_auth_user` is the
-- login PgBouncer runs its auth_query as (null: no pooler, nothing is installed in
-- project databases); project steps give it EXECUTE on `capy_pooler.lookup` and CONNECT
-- on each project database. The operator creates that role with its password.
alter table clusters add column pooled_host text;
alter table clusters add column pooler_auth_user text;
alter table clusters add constraint clusters_pooler_auth_user_name
    check (pooler_auth_user ~ '^[a-z][a-z0-9_]{0,62}$');
alter table clusters add constraint clusters_pooled_host_name
    check (pooled_host ~ '^[A-Za-z0-9.:\[\]-]{1,253}$');
