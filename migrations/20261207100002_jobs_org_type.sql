-- no-transaction
-- The jobs list of one organization filtered by type (GET /v1/jobs?type=…), as
-- jobs_org_state does for states.
create index concurrently if not exists jobs_org_type
    on jobs (organization_id, type, id desc) where organization_id is not null;
