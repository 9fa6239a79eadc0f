-- Extensions an operator allows on a cluster although PostgreSQL does not mark them
-- trusted (issue 10). Trusted extensions need no entry: tenants install them as
-- themselves. An allowed untrusted one is installed by the cluster's admin into a schema
-- the tenant cannot write. Expand-only: a new column with a default.
alter table clusters add column allowed_extensions text[] not null default '{}';
