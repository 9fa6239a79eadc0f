-- The next slot of a periodic job strictly after `after`: daily at `minute_of_day`
-- (UTC), or every `every_seconds` counted from `previous` (its last slot). Slots missed
-- while no worker ran are skipped, not made up: the answer is always after `after`.
create function periodic_next_run(minute_of_day integer, every_seconds integer,
                                  previous timestamptz, after timestamptz)
returns timestamptz
language sql immutable parallel safe
as $$
    select case
        when minute_of_day is not null then
            (date_trunc('day', after at time zone 'UTC') + make_interval(mins => minute_of_day))
                at time zone 'UTC'
            + case when (date_trunc('day', after at time zone 'UTC')
                         + make_interval(mins => minute_of_day)) at time zone 'UTC' <= after
                   then interval '1 day' else interval '0' end
        else
            coalesce(previous, after) + make_interval(secs => every_seconds * (
                floor(greatest(extract(epoch from after - coalesce(previous, after)), 0)
                      / every_seconds) + 1))
    end
$$;
