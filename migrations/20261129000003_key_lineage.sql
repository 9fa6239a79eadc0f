-- Lifecycles (issue 10). Expand-only.

-- Who made a key: revoking or expiring a key ends every key it made, transitively.
-- Authentication walks a key's makers up this column (a primary-key probe per level);
-- revoking walks down it through the index below.
alter table api_keys add column created_by_key_id uuid references api_keys (id);
create index api_keys_created_by on api_keys (created_by_key_id)
    where created_by_key_id is not null;
-- Deleting a project ends the keys narrowed to it.
create index api_keys_project on api_keys (project_id) where project_id is not null;

-- An Idempotency-Key's reservation: the layer takes the key with a fresh token, and
-- the handler's transaction stores the answer only while that token still holds the
-- key, in the same transaction as the work (a request presumed dead whose key was
-- taken again cannot commit its work any more).
alter table idempotency_keys add column reservation uuid;
