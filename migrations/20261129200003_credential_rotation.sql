-- Credential rotation (issue 11). PostgreSQL has one password per role, so a rotation
-- makes a new login role (`<database>_r<n>`) and retires the old one after a grace.
--
-- pending_*: the login a `project.rotate_credentials` job creates, chosen (and its
-- password sealed) by the API when the rotation is asked; never in the job's args,
-- which the API shows. Kept after a failed rotation, so the next one reuses it (the
-- role may already exist on the cluster) and a delete drops it.
-- previous_*: the login a completed rotation replaced, until the
-- `project.retire_credentials` job queued for `previous_expires_at` drops it. Its
-- password is not kept: nothing needs it.
-- credential_rotations: how many logins rotations have made (the `<n>` of the name).
alter table projects
    add column pending_role_name          text,
    add column pending_password_encrypted bytea,
    add column previous_role_name         text,
    add column previous_expires_at        timestamptz,
    add column credential_rotations       integer not null default 0,
    add constraint projects_pending_login check
        ((pending_role_name is null) = (pending_password_encrypted is null));
