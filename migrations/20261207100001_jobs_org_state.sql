-- no-transaction
-- The jobs list of one organization filtered by state (GET /v1/jobs?state=failed) reads
-- this index in id order instead of the organization's whole history. Partial: internal
-- jobs (no organization), the queue's bulk, cost it nothing on their state changes.
-- Built concurrently, one statement per file, so the queue keeps running meanwhile.
create index concurrently if not exists jobs_org_state
    on jobs (organization_id, state, id desc) where organization_id is not null;
