-- Each client holds at most a few live unclaimed instant databases (issue 10): one
-- client must not fill a cluster's bound for the 72 hours they live. A database
-- handed out records who asked: `client_key`, the key of its rate limit (an IPv4
-- address, an IPv6 /64), and `client_site`, a coarser block (an IPv4 address, an
-- IPv6 /48) that caps the many /64s one site holds. The index keeps the count, taken
-- under a lock of the site's, a probe of the site's few live rows.
alter table projects
    add column client_key  text,
    add column client_site text;

create index projects_instant_client on projects (client_site)
    where instant_status = 'unclaimed' and deleted_at is null;
