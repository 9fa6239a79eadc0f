-- Tenant ownership (issue 10): a project's database is now owned by a NOLOGIN role the
-- tenant cannot become, so its own SQL cannot lift the limits capy sets. Projects made
-- before are moved by a job, not here: one project.update per live project (ready, or in error: a failed step may have left
-- its database behind), whose
-- step (the same converge routine as project.create) changes the database's owner,
-- grants and schema on its cluster. Expand-only: rows are added to jobs, nothing else.

-- Serialise with the API's enqueues, so each new job takes its place in submission
-- order: one table lock for the migration's moment (a lock per project could exhaust
-- the lock table on a large installation).
lock table jobs in exclusive mode;

-- Job ids are UUIDv7 (time-ordered, as Uuid::now_v7 makes them): the millisecond
-- clock in the first 48 bits, version bits 0111.
insert into jobs (id, type, organization_id, project_id, cluster_id, locked_resource,
                  max_attempts, args)
select encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
                 placing substring(int8send(floor(extract(epoch from clock_timestamp()) * 1000)::bigint)
                                   from 3)
                 from 1 for 6), 52, 1), 53, 1), 'hex')::uuid,
       'project.update', p.organization_id, p.id, p.cluster_id, 'project:' || p.id::text,
       5, '{"reason": "tenant_ownership"}'::jsonb
from projects p
where p.deleted_at is null and p.state in ('ready', 'error')
order by p.id;

select pg_notify('capy_jobs', '');
