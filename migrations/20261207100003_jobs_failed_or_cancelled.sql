-- no-transaction
-- Failures are few among finished jobs: the fleet-wide list of failed or cancelled jobs
-- (platform admins) reads them here rather than walking every completed job's id.
-- Only rows in these states have an entry, so successful jobs never touch it.
create index concurrently if not exists jobs_failed_or_cancelled
    on jobs (id desc) where state in ('failed', 'cancelled');
