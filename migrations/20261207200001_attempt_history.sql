-- A completed attempt is described by its job's own row (claimed_by, claimed_at,
-- completed_at, last_exit_code, last_stdout, last_stderr), and a completed job never
-- runs again; so from now on only attempts that did not complete (failed, retried,
-- cancelled, lost) are written to job_attempts. That spares every successful job a
-- heap tuple, an index entry and a foreign-key check that locks its row (issue 14).
--
-- Every attempt, as operators read them: the recorded ones, and a completed job's last
-- attempt from the job itself unless it was recorded (jobs completed before this
-- migration were). Both branches are read by primary key when filtered on job_id.
create view job_attempt_history as
select job_id, attempt, worker, started_at, finished_at, exit_code, classification, error,
       stdout, stderr
from job_attempts
union all
select j.id, j.attempts, coalesce(j.claimed_by, '?'), coalesce(j.claimed_at, j.completed_at),
       j.completed_at, j.last_exit_code, null, null, coalesce(j.last_stdout, ''),
       coalesce(j.last_stderr, '')
from jobs j
where j.state = 'completed' and j.attempts > 0
  and not exists (select 1 from job_attempts a where a.job_id = j.id and a.attempt = j.attempts);
