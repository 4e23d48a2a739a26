-- sitewatch schema for PostgreSQL 12+ (tested on 15).
--
-- Applied by `sitewatch init-db` (inside one transaction, under an advisory lock, so two
-- concurrent runs serialize). Every statement is idempotent: IF NOT EXISTS for tables,
-- indexes and columns, CREATE OR REPLACE for functions and views. An upgrade adds statements
-- at the end (ALTER TABLE ... ADD COLUMN IF NOT EXISTS ...) and bumps schema_version; running
-- the whole file again on an existing database is always safe.
--
-- Nothing here is partition-specific at write time: the sink creates daily partitions of
-- `checks` ahead of time with sitewatch_ensure_check_partition() and drops expired ones with
-- sitewatch_drop_check_partitions().

CREATE TABLE IF NOT EXISTS sitewatch_schema (
    version    integer     PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- Targets as last seen in the records (the sink upserts them with each batch).
CREATE TABLE IF NOT EXISTS targets (
    id         text        PRIMARY KEY,
    url        text        NOT NULL,
    first_seen timestamptz NOT NULL,
    last_seen  timestamptz NOT NULL,
    last_agent text        NOT NULL
);

-- One row per check record (sitewatch::result::CheckResult, schema v1), every field a typed
-- column; timings.* become *_ms columns.
--
-- Dedupe: a unique constraint on a partitioned table must include the partition key, so the
-- key is (check_id, started_at). started_at is part of the immutable record, so a redelivered
-- record always has the same pair and `ON CONFLICT DO NOTHING` drops it; a separate dedupe
-- table would cost a second index write per row and need its own retention.
CREATE TABLE IF NOT EXISTS checks (
    check_id        text             NOT NULL,
    started_at      timestamptz      NOT NULL,
    target          text             NOT NULL,
    url             text             NOT NULL,
    agent           text             NOT NULL,
    agent_version   text             NOT NULL,
    v               integer          NOT NULL,
    up              boolean          NOT NULL,
    failure         text,            -- null when up; dns, connect, tls, timeout, http_status, ...
    error           text,
    attempt         bigint           NOT NULL,
    method          text             NOT NULL,
    status          integer,
    http_version    text,
    final_url       text,
    redirects       bigint           NOT NULL,
    remote_ip       text,
    body_bytes      bigint           NOT NULL,
    body_truncated  boolean          NOT NULL,
    total_ms        double precision NOT NULL,
    dns_ms          double precision,
    connect_ms      double precision,
    tls_ms          double precision,
    ttfb_ms         double precision,
    transfer_ms     double precision,
    tls_version     text,
    cert_not_after  timestamptz,
    cert_days_left  double precision,
    cert_issuer     text,
    regex           text,
    regex_matched   boolean,
    rule            text,
    rule_hash       text,
    rule_verdict    text,
    rule_reason     text,
    rule_extra      jsonb,
    rule_ms         double precision,
    tags            text[]           NOT NULL DEFAULT '{}',
    -- Where the sink read the record: lets an operator trace a row back to the topic.
    kafka_partition integer          NOT NULL,
    kafka_offset    bigint           NOT NULL,
    inserted_at     timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (check_id, started_at)
) PARTITION BY RANGE (started_at);

-- "Latest per target" and "a target over a time range" (both walk this index backwards).
CREATE INDEX IF NOT EXISTS checks_target_time ON checks (target, started_at DESC);
-- Down checks are rare: a small partial index answers "when was it last down" for the
-- current_state view without scanning every up row.
CREATE INDEX IF NOT EXISTS checks_target_down ON checks (target, started_at DESC) WHERE NOT up;

-- Where each (topic, partition) resumes: written in the same transaction as the rows.
CREATE TABLE IF NOT EXISTS sink_offsets (
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    next_offset bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);

-- Messages that did not decode or validate, with the reason. value holds at most the first
-- 64 KiB of the message (value_bytes says how long it was), so a hostile producer cannot
-- bloat the database through this table.
CREATE TABLE IF NOT EXISTS dead_letters (
    topic        text        NOT NULL,
    partition    integer     NOT NULL,
    "offset"     bigint      NOT NULL,
    kafka_ts     timestamptz,
    key          bytea,
    value        bytea,
    value_bytes  integer,
    error        text        NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition, "offset")
);
CREATE INDEX IF NOT EXISTS dead_letters_received ON dead_letters (received_at);

-- Creates the daily partition of `checks` holding `day` (UTC) unless it exists. Serialized by
-- a transaction-level advisory lock so concurrent sinks do not race on the catalog.
CREATE OR REPLACE FUNCTION sitewatch_ensure_check_partition(day date) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    name text := 'checks_p' || to_char(day, 'YYYYMMDD');
BEGIN
    IF to_regclass(quote_ident(name)) IS NULL THEN
        PERFORM pg_advisory_xact_lock(hashtext('sitewatch.check_partitions'));
        EXECUTE format(
            'CREATE TABLE IF NOT EXISTS %I PARTITION OF checks FOR VALUES FROM (%L) TO (%L)',
            name,
            (day::timestamp AT TIME ZONE 'UTC'),
            ((day + 1)::timestamp AT TIME ZONE 'UTC'));
    END IF;
    RETURN name;
END
$$;

-- Drops the daily partitions whose whole day ends at or before `older_than`; returns their
-- names. Only tables named by sitewatch_ensure_check_partition are considered.
CREATE OR REPLACE FUNCTION sitewatch_drop_check_partitions(older_than timestamptz)
RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    part record;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('sitewatch.check_partitions'));
    FOR part IN
        SELECT c.relname
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'checks'::regclass AND c.relname ~ '^checks_p[0-9]{8}$'
        ORDER BY c.relname
    LOOP
        IF ((to_date(substr(part.relname, 9), 'YYYYMMDD') + 1)::timestamp AT TIME ZONE 'UTC')
                <= older_than THEN
            EXECUTE format('DROP TABLE %I', part.relname);
            RETURN NEXT part.relname;
        END IF;
    END LOOP;
END
$$;

-- Current state per target: the last check, and since when the target has been in that state
-- (the first check after the last one in the other state; the first check ever if none).
CREATE OR REPLACE VIEW target_status AS
SELECT t.id                                        AS target,
       t.url,
       last.started_at                             AS last_check,
       last.up,
       last.failure,
       last.error,
       last.status,
       last.total_ms,
       last.agent,
       COALESCE(since.started_at, first.started_at) AS since,
       now() - COALESCE(since.started_at, first.started_at) AS for_duration
FROM targets t
CROSS JOIN LATERAL (
    SELECT c.started_at, c.up, c.failure, c.error, c.status, c.total_ms, c.agent
    FROM checks c WHERE c.target = t.id
    ORDER BY c.started_at DESC LIMIT 1
) last
LEFT JOIN LATERAL (
    -- The last check in the other state: via the partial index when the target is up now.
    SELECT c.started_at FROM checks c
    WHERE c.target = t.id AND c.up = NOT last.up
    ORDER BY c.started_at DESC LIMIT 1
) flip ON true
LEFT JOIN LATERAL (
    SELECT c.started_at FROM checks c
    WHERE c.target = t.id AND c.started_at > flip.started_at
    ORDER BY c.started_at ASC LIMIT 1
) since ON true
LEFT JOIN LATERAL (
    SELECT c.started_at FROM checks c
    WHERE c.target = t.id AND flip.started_at IS NULL
    ORDER BY c.started_at ASC LIMIT 1
) first ON true;

-- Uptime and latency (timings.total, every check counted) per target over the last hour, day
-- and week: one row per (target, window) with checks in that window.
CREATE OR REPLACE VIEW target_uptime AS
SELECT c.target,
       w.name                                                         AS period,
       count(*)                                                       AS checks,
       count(*) FILTER (WHERE c.up)                                   AS up_checks,
       round(100.0 * count(*) FILTER (WHERE c.up) / count(*), 3)      AS uptime_pct,
       percentile_cont(0.50) WITHIN GROUP (ORDER BY c.total_ms)       AS p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY c.total_ms)       AS p95_ms,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY c.total_ms)       AS p99_ms
FROM (VALUES ('1h', interval '1 hour', 1),
             ('24h', interval '24 hours', 2),
             ('7d', interval '7 days', 3)) AS w(name, span, ord)
JOIN checks c ON c.started_at >= now() - w.span AND c.started_at <= now()
GROUP BY c.target, w.name, w.ord
ORDER BY c.target, w.ord;

-- Alerts (`[alerts]`, cargo feature `alerts`). The sink decides state changes in the same
-- transaction that stores a fetch's rows and offset, so a transition is written exactly once:
-- alert_state holds each target's state, alert_events is the outbox, and alert_deliveries says
-- per event and channel whether the notifier has delivered it.

-- One row per target the sink has evaluated. Written only by the owner of the target's
-- partition (records are keyed by target), inside its batch transaction.
CREATE TABLE IF NOT EXISTS alert_state (
    target     text        PRIMARY KEY,
    state      text        NOT NULL,            -- up, down, degraded
    fails      integer     NOT NULL DEFAULT 0,  -- consecutive failed checks
    oks        integer     NOT NULL DEFAULT 0,  -- consecutive up checks (toward recovery)
    slows      integer     NOT NULL DEFAULT 0,  -- consecutive checks over the latency budget
    cert_level integer,                         -- certificate warning level alerted (days)
    since      timestamptz NOT NULL,            -- when the current state began
    last_check timestamptz NOT NULL,            -- the newest check evaluated (older ones are not)
    incident   text,                            -- key of the current episode (PagerDuty dedup_key)
    alerted    boolean     NOT NULL DEFAULT false, -- an event went out for this episode
    muted      text,                            -- why this episode's event was not created
    last_event timestamptz,                     -- for reminders
    reason     text
);

-- The outbox: one row per transition. `key` is the idempotency key receivers see.
CREATE TABLE IF NOT EXISTS alert_events (
    id         bigserial   PRIMARY KEY,
    key        text        NOT NULL UNIQUE,
    target     text        NOT NULL,
    url        text        NOT NULL,
    kind       text        NOT NULL,  -- down, degraded, reminder, resolved
    state      text        NOT NULL,  -- the state after the transition
    previous   text        NOT NULL,
    reason     text        NOT NULL,
    incident   text        NOT NULL,
    check_id   text        NOT NULL,  -- the check that decided it
    at         timestamptz NOT NULL,  -- that check's started_at
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS alert_events_target ON alert_events (target, id DESC);

-- Delivery of each event to each channel configured when it was created.
CREATE TABLE IF NOT EXISTS alert_deliveries (
    event_id     bigint      NOT NULL REFERENCES alert_events (id) ON DELETE CASCADE,
    channel      text        NOT NULL,
    state        text        NOT NULL DEFAULT 'pending',  -- pending, delivered, failed, abandoned
    attempts     integer     NOT NULL DEFAULT 0,
    next_attempt timestamptz NOT NULL DEFAULT now(),
    lease_until  timestamptz,  -- a notifier is delivering it until then
    last_status  integer,
    last_error   text,
    delivered_at timestamptz,
    PRIMARY KEY (event_id, channel)
);
CREATE INDEX IF NOT EXISTS alert_deliveries_pending
    ON alert_deliveries (channel, event_id) WHERE state = 'pending';

-- Targets not up now, with the event that opened the episode (if one went out).
CREATE OR REPLACE VIEW open_alerts AS
SELECT s.target, s.state, s.since, now() - s.since AS for_duration, s.reason, s.alerted,
       s.muted, s.incident, s.last_check
FROM alert_state s
WHERE s.state <> 'up';

-- Every event, newest first, with its deliveries summed up.
CREATE OR REPLACE VIEW alert_history AS
SELECT e.id, e.created_at, e.at, e.target, e.kind, e.previous, e.state, e.reason, e.key,
       count(d.*) FILTER (WHERE d.state = 'delivered') AS delivered,
       count(d.*) FILTER (WHERE d.state = 'pending')   AS pending,
       count(d.*) FILTER (WHERE d.state = 'failed')    AS failed,
       count(d.*) FILTER (WHERE d.state = 'abandoned') AS abandoned
FROM alert_events e
LEFT JOIN alert_deliveries d ON d.event_id = e.id
GROUP BY e.id
ORDER BY e.id DESC;

-- Per channel: what waits, what failed, and the last error (a channel that keeps failing).
-- (New columns go last: CREATE OR REPLACE VIEW only appends.)
CREATE OR REPLACE VIEW alert_channels AS
SELECT d.channel,
       count(*) FILTER (WHERE d.state = 'pending')   AS pending,
       count(*) FILTER (WHERE d.state = 'delivered') AS delivered,
       count(*) FILTER (WHERE d.state = 'failed')    AS failed,
       max(d.attempts) FILTER (WHERE d.state = 'pending') AS max_attempts,
       max(d.delivered_at) AS last_delivered,
       (SELECT x.last_error FROM alert_deliveries x
        WHERE x.channel = d.channel AND x.last_error IS NOT NULL
        ORDER BY x.event_id DESC LIMIT 1) AS last_error,
       count(*) FILTER (WHERE d.state = 'abandoned') AS abandoned
FROM alert_deliveries d
GROUP BY d.channel;

INSERT INTO sitewatch_schema (version) VALUES (1) ON CONFLICT (version) DO NOTHING;

-- Version 2: where the agent probes from (`[agent] location`); null for records of agents
-- without one and for rows written before. Adding a nullable column without a default
-- rewrites nothing, on the parent and on every partition.
ALTER TABLE checks ADD COLUMN IF NOT EXISTS location text;
INSERT INTO sitewatch_schema (version) VALUES (2) ON CONFLICT (version) DO NOTHING;

-- Version 3: the fleet (`[fleet]`). Each fleet agent publishes a liveness record to the
-- compacted topic sitewatch.agents every few seconds; the sink keeps the latest per agent here
-- (an upsert that never replaces a newer row). last_seen is the agent's timestamp of the
-- record; record_every is how often the agent sends one.
CREATE TABLE IF NOT EXISTS agent_status (
    agent_id          text             PRIMARY KEY,
    location          text,
    "group"           text             NOT NULL,  -- the consumer group (<group>.<location>)
    version           text             NOT NULL,
    last_seen         timestamptz      NOT NULL,
    record_every      interval         NOT NULL,
    generation        integer,
    targets_owned     bigint           NOT NULL,  -- fleet targets of its partitions
    checks_per_second double precision NOT NULL,  -- since its previous record
    spool_records     bigint           NOT NULL,
    spool_bytes       bigint           NOT NULL,
    updated_at        timestamptz      NOT NULL DEFAULT now()
);

-- Each agent, `silent` once three records in a row are missing, `alive` before.
CREATE OR REPLACE VIEW agent_liveness AS
SELECT a.agent_id, a.location, a."group", a.version, a.last_seen,
       now() - a.last_seen AS silent_for,
       CASE WHEN a.last_seen < now() - 3 * a.record_every THEN 'silent' ELSE 'alive' END AS state,
       a.targets_owned, a.checks_per_second, a.spool_records, a.spool_bytes, a.generation
FROM agent_status a;

-- Latest check per target and location (a null location: agents without one) within the
-- last day: every location probes every target, so this is what each one sees now. Bounded
-- to a day so it reads the newest partitions only, never the whole retention.
CREATE OR REPLACE VIEW target_status_by_location AS
SELECT DISTINCT ON (c.target, c.location)
       c.target, c.location, c.started_at AS last_check, c.up, c.failure, c.error, c.status,
       c.total_ms, c.agent
FROM checks c
WHERE c.started_at >= now() - interval '1 day'
ORDER BY c.target, c.location, c.started_at DESC;

-- The quorum's settings, one row: a target is down when at least min_down of the locations
-- that count see it down. A location counts for a target when its latest check of it started
-- within fresh_for (a few check intervals) and, if the location has fleet agents in
-- agent_status, at least one of them is alive (so a location whose agents went silent stops
-- counting after three missed liveness records, not after fresh_for).
CREATE TABLE IF NOT EXISTS quorum_settings (
    one       boolean  PRIMARY KEY DEFAULT true CHECK (one),
    min_down  integer  NOT NULL DEFAULT 2 CHECK (min_down >= 1),
    fresh_for interval NOT NULL DEFAULT interval '90 seconds'  -- three default intervals
);
INSERT INTO quorum_settings DEFAULT VALUES ON CONFLICT (one) DO NOTHING;

CREATE OR REPLACE VIEW target_quorum AS
WITH s AS (SELECT min_down, fresh_for FROM quorum_settings),
counted AS (
    SELECT l.target, l.location, l.up
    FROM target_status_by_location l CROSS JOIN s
    WHERE l.last_check >= now() - s.fresh_for
      AND (NOT EXISTS (SELECT 1 FROM agent_liveness a WHERE a.location = l.location)
           OR EXISTS (SELECT 1 FROM agent_liveness a
                      WHERE a.location = l.location AND a.state = 'alive'))
)
SELECT c.target,
       count(*)                                               AS locations,
       count(*) FILTER (WHERE NOT c.up)                       AS locations_down,
       array_agg(c.location ORDER BY c.location) FILTER (WHERE NOT c.up) AS down_in,
       s.min_down,
       count(*) FILTER (WHERE NOT c.up) >= s.min_down         AS down
FROM counted c CROSS JOIN s
GROUP BY c.target, s.min_down;

INSERT INTO sitewatch_schema (version) VALUES (3) ON CONFLICT (version) DO NOTHING;

-- Version 4: rollups. Per target and location, per hour and per day (UTC): how many checks,
-- how many were up, the sum of timings.total and a fixed-bucket histogram of it (bounds in
-- sitewatch::sink::rollup::TOTAL_MS_BOUNDS; the last bucket is open). The sink adds a batch's
-- new rows in the same transaction as the rows themselves, so a rollup always equals the
-- aggregate of the raw checks it covers, and the status page reads 90 days of thousands of
-- targets from these small tables instead of from `checks`. `location` is null for records
-- that carry none; the unique index treats null as one location.
CREATE TABLE IF NOT EXISTS check_rollups_hourly (
    target        text             NOT NULL,
    location      text,
    period_start  timestamptz      NOT NULL,
    checks        bigint           NOT NULL,
    successes     bigint           NOT NULL,
    total_ms_sum  double precision NOT NULL,
    total_ms_hist bigint[]         NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS check_rollups_hourly_key
    ON check_rollups_hourly (target, (COALESCE(location, '')), period_start);
CREATE INDEX IF NOT EXISTS check_rollups_hourly_time ON check_rollups_hourly (period_start);
CREATE TABLE IF NOT EXISTS check_rollups_daily (LIKE check_rollups_hourly);
CREATE UNIQUE INDEX IF NOT EXISTS check_rollups_daily_key
    ON check_rollups_daily (target, (COALESCE(location, '')), period_start);
CREATE INDEX IF NOT EXISTS check_rollups_daily_time ON check_rollups_daily (period_start);

-- Element-wise sum of two histograms (a missing element counts 0).
CREATE OR REPLACE FUNCTION sitewatch_add_counts(a bigint[], b bigint[]) RETURNS bigint[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT array_agg(COALESCE(x, 0) + COALESCE(y, 0) ORDER BY i)
    FROM unnest(a, b) WITH ORDINALITY AS u(x, y, i)
$$;

-- The q quantile (0..1) of a timings.total histogram as its bucket's upper bound, the way
-- sitewatch::sink::rollup::quantile computes it (the open bucket answers with the last bound);
-- null without checks. For SQL readers of the rollups (packaging/grafana/).
CREATE OR REPLACE FUNCTION sitewatch_hist_quantile(hist bigint[], q double precision)
RETURNS double precision
LANGUAGE sql IMMUTABLE AS $$
    SELECT (ARRAY[25, 50, 100, 200, 300, 500, 1000, 2000, 5000, 10000, 10000]::float8[])[min(i)]
    FROM (SELECT i, sum(h) OVER (ORDER BY i) AS seen, sum(h) OVER () AS total
          FROM unnest(hist) WITH ORDINALITY AS u(h, i)) x
    WHERE total > 0 AND seen >= greatest(ceil(q * total), 1)
$$;

INSERT INTO sitewatch_schema (version) VALUES (4) ON CONFLICT (version) DO NOTHING;

-- Version 5: each target's tags as of its newest record (the sink writes them with `url`), so
-- the status page picks a page of `?tag=` among 100,000 targets from this table and its GIN
-- index instead of reading every target's latest check. Targets written before get the tags
-- of their latest check once (a target without checks gets none).
ALTER TABLE targets ADD COLUMN IF NOT EXISTS tags text[];
UPDATE targets t
SET tags = COALESCE((SELECT c.tags FROM checks c WHERE c.target = t.id
                     ORDER BY c.started_at DESC LIMIT 1), '{}')
WHERE t.tags IS NULL;
CREATE INDEX IF NOT EXISTS targets_tags ON targets USING gin (tags);
INSERT INTO sitewatch_schema (version) VALUES (5) ON CONFLICT (version) DO NOTHING;

-- Version 6: alert state per location (`[alerts] quorum`). Each location that checks a target
-- has its own health here, decided by the thresholds from its checks alone; the target's row
-- of alert_state follows the quorum of the locations that count (see sitewatch::alerts::eval).
-- A target checked only by agents without a location has no rows here: its one location is
-- its alert_state row, as before. location '' stands for records without one.
CREATE TABLE IF NOT EXISTS alert_locations (
    target     text        NOT NULL,
    location   text        NOT NULL,
    state      text        NOT NULL,            -- up, down, degraded (as this location sees it)
    fails      integer     NOT NULL DEFAULT 0,
    oks        integer     NOT NULL DEFAULT 0,
    slows      integer     NOT NULL DEFAULT 0,
    cert_level integer,
    since      timestamptz NOT NULL,
    last_check timestamptz NOT NULL,            -- whether the location counts depends on it
    reason     text,
    PRIMARY KEY (target, location)
);
-- The named locations that saw the target down (degraded) when the event was decided.
ALTER TABLE alert_events ADD COLUMN IF NOT EXISTS locations text[] NOT NULL DEFAULT '{}';
INSERT INTO sitewatch_schema (version) VALUES (6) ON CONFLICT (version) DO NOTHING;
