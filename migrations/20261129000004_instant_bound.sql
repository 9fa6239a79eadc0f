-- Instant databases have their own bound per cluster (issue 10): the pool entries and
-- unclaimed databases of a cluster are counted before each new one, under a lock of
-- that cluster's. This index keeps the count a probe of the few live instant rows,
-- however many projects the cluster holds.
create index projects_instant_live on projects (cluster_id)
    where instant_status in ('pool', 'unclaimed') and deleted_at is null;
