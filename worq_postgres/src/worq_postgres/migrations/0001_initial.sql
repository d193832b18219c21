-- worq-postgres schema, version 1: every table, index and function the broker and the storage
-- use. Applied by worq_postgres.migrate() with search_path set to the target schema, so every
-- name here is unqualified. Times are Unix seconds from the server's clock.

CREATE FUNCTION worq_now() RETURNS float8
LANGUAGE sql VOLATILE AS $$ SELECT extract(epoch FROM clock_timestamp())::float8 $$;

CREATE SEQUENCE worq_seq;    -- FIFO order within a priority level
CREATE SEQUENCE worq_token;  -- lease tokens: every fetch takes a fresh one

-- Every job the broker holds, in any state. Acknowledged and cancelled jobs are deleted.
-- state: 'queued' (ready), 'scheduled' (eta), 'retrying' (backoff), 'running' (leased),
-- 'dead'. A scheduled/retrying job whose due time passed, or a running one whose lease ran
-- out, reads as queued and is moved back by the next fetch.
-- A unique job carries its key, when it lets go of it ('started' or 'done') and for how long
-- the key stays taken after that (unique_hold); a workflow member its group and index, and a
-- chord's callback the group it closes; a limited job its limits, and ``granted``: its rate
-- slot is counted for this run (set when it is leased or set aside for a slot; cleared by a
-- retry or an expired lease). A running job's ``holder`` is the worker it was fetched for
-- (fetch(worker=), for worq_extend_worker); every lease sets it, NULL when fetched for none.
CREATE TABLE worq_jobs (
    id text PRIMARY KEY,
    queue text NOT NULL,
    body bytea NOT NULL,
    priority integer NOT NULL DEFAULT 0,
    seq bigint NOT NULL,
    state text NOT NULL CHECK (state IN ('queued', 'scheduled', 'retrying', 'running', 'dead')),
    due float8 NOT NULL DEFAULT 0,
    attempts integer NOT NULL DEFAULT 0,
    token bigint,
    lease_until float8,
    progress bytea,
    cancel_requested boolean NOT NULL DEFAULT false,
    reason text NOT NULL DEFAULT '',
    died_at float8,
    unique_key text,
    unique_until text,
    unique_hold float8 NOT NULL DEFAULT 0,
    member_group text,
    member_index integer,
    closes text,
    rate_key text,
    rate_interval float8,
    rate_burst integer,
    conc_key text,
    conc_limit integer,
    granted boolean NOT NULL DEFAULT false,
    holder text
) WITH (
    fillfactor = 80,  -- room for HOT updates: state changes rewrite the row in place
    -- Every acknowledged job leaves a dead row behind; the default (20% of the table) lets a
    -- table that is small but busy pile up dead rows without end, so vacuum by count instead,
    -- without throttling. (The broker also vacuums it itself when autovacuum lags.)
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 5000
);

-- Fetch reads only this small partial index, however many other rows the table holds.
CREATE INDEX worq_jobs_ready ON worq_jobs (queue, priority DESC, seq) WHERE state = 'queued';
CREATE INDEX worq_jobs_waiting ON worq_jobs (queue, due) WHERE state IN ('scheduled', 'retrying');
CREATE INDEX worq_jobs_leased ON worq_jobs (queue, lease_until) WHERE state = 'running';
-- A queue's dead jobs newest first (listing, and retention's count cut-off) from the index
-- alone; and every queue's by age, so dropping the old ones costs what is dropped.
CREATE INDEX worq_jobs_dead ON worq_jobs (queue, died_at, seq) WHERE state = 'dead';
CREATE INDEX worq_jobs_died ON worq_jobs (died_at) WHERE state = 'dead';
-- Permits are leases: the running jobs of a key whose lease still holds.
CREATE INDEX worq_jobs_permits ON worq_jobs (queue, conc_key)
    WHERE state = 'running' AND conc_key IS NOT NULL;
-- Whether a queue has limited jobs waiting at all (else fetch takes its set-based path).
CREATE INDEX worq_jobs_limited ON worq_jobs (queue)
    WHERE state = 'queued' AND (conc_key IS NOT NULL OR rate_key IS NOT NULL);

-- Queues that ever held a job, for stats() without a queue list.
CREATE TABLE worq_queues (name text PRIMARY KEY);

-- Job records (results, final errors, cancellations) with their expiry.
CREATE TABLE worq_results (
    id text PRIMARY KEY,
    data bytea NOT NULL,
    expires float8 NOT NULL
) WITH (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0
);
CREATE INDEX worq_results_expires ON worq_results (expires);

CREATE TABLE worq_workers (
    id text PRIMARY KEY,
    info jsonb NOT NULL,
    expires float8 NOT NULL
);

-- One row per schedule: the tick it last fired. fire_schedule() is a compare-and-set on it.
CREATE TABLE worq_schedules (
    name text PRIMARY KEY,
    last_fire float8 NOT NULL
);

-- Recent job events, oldest trimmed past the broker's bound; ids are the stream's cursor.
CREATE TABLE worq_events (
    id bigserial PRIMARY KEY,
    kind text NOT NULL,
    job_id text NOT NULL,
    task text NOT NULL,
    queue text NOT NULL,
    at float8 NOT NULL,
    attempt integer NOT NULL,
    worker text NOT NULL,
    detail text NOT NULL
);

-- Keys taken, per queue: by the job ``holder`` while ``by_job`` (and while that job is still
-- held, with this key), else until ``until`` (hold_for after it let go).
CREATE TABLE worq_unique (
    queue text NOT NULL,
    key text NOT NULL,
    holder text NOT NULL,
    by_job boolean NOT NULL,
    until float8 NOT NULL DEFAULT 0,
    PRIMARY KEY (queue, key)
);

-- A group: which indexes finished (and failed) with which outputs, and the callback that the
-- step counting the last index enqueues. A complete group expires ``ttl`` after completion
-- unless a job that ``closes`` it releases it first.
CREATE TABLE worq_groups (
    id text PRIMARY KEY,
    size integer NOT NULL,
    run_on_failure boolean NOT NULL,
    ttl float8 NOT NULL,
    outputs bytea[] NOT NULL,
    finished integer[] NOT NULL DEFAULT '{}',
    failed integer[] NOT NULL DEFAULT '{}',
    callback_sent boolean NOT NULL DEFAULT false,
    expires float8,
    cb_id text,
    cb_queue text,
    cb_body bytea,
    cb_priority integer,
    cb_eta float8,
    cb_clear boolean,
    cb_group text,
    cb_index integer,
    cb_closes text
);
CREATE INDEX worq_groups_expires ON worq_groups (expires) WHERE expires IS NOT NULL;

-- Each rate key's theoretical arrival time (GCRA), per queue.
CREATE TABLE worq_rates (
    queue text NOT NULL,
    key text NOT NULL,
    tat float8 NOT NULL,
    PRIMARY KEY (queue, key)
);

-- Every function runs with the search_path it was created under (SET ... FROM CURRENT), so
-- it finds its own tables whatever the caller's search_path is (transactional enqueue runs
-- on the application's own connection).

-- Enqueue a batch, all or nothing; returns the ids it did not add (one per message refused,
-- empty when it added them all): an id already held (in any state, any queue) is left alone,
-- and the first of two equal ids in the batch wins. A column of one element (queue, priority,
-- eta, clear) stands for every message, so a large uniform batch sends two long arrays, not
-- six. Added jobs flagged in p_clear have their old record deleted in the same transaction.
-- Wakes idle workers through NOTIFY, which PostgreSQL delivers only when the transaction
-- commits.
CREATE FUNCTION worq_enqueue(
    p_channel text, p_ids text[], p_queues text[], p_bodies bytea[], p_priorities integer[],
    p_etas float8[], p_clear boolean[]
) RETURNS text[]
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_now float8 := worq_now();
    v_added text[];
    v_refused text[] := '{}';
    v_queue text;
BEGIN
    IF cardinality(p_ids) = 1 THEN  -- one by one: plain statements, cheaper than the set path
        INSERT INTO worq_jobs (id, queue, body, priority, seq, state, due)
        VALUES (p_ids[1], p_queues[1], p_bodies[1], p_priorities[1], nextval('worq_seq'),
                CASE WHEN p_etas[1] > v_now THEN 'scheduled' ELSE 'queued' END,
                coalesce(p_etas[1], 0))
        ON CONFLICT (id) DO NOTHING;
        IF NOT FOUND THEN
            RETURN p_ids;
        END IF;
        IF NOT EXISTS (SELECT 1 FROM worq_queues WHERE name = p_queues[1]) THEN
            INSERT INTO worq_queues (name) VALUES (p_queues[1]) ON CONFLICT DO NOTHING;
        END IF;
        IF p_clear[1] THEN
            DELETE FROM worq_results WHERE id = p_ids[1];
        END IF;
        PERFORM pg_notify(p_channel, p_queues[1]);
        RETURN v_refused;
    END IF;
    WITH m AS (
        SELECT * FROM unnest(p_ids, p_bodies, p_queues, p_priorities, p_etas)
            WITH ORDINALITY AS m(id, body, queue, priority, eta, ord)
        ORDER BY ord
    ), ins AS (
        INSERT INTO worq_jobs (id, queue, body, priority, seq, state, due)
        SELECT m.id,
               CASE WHEN cardinality(p_queues) = 1 THEN p_queues[1] ELSE m.queue END,
               m.body,
               CASE WHEN cardinality(p_priorities) = 1 THEN p_priorities[1] ELSE m.priority END,
               nextval('worq_seq'),
               CASE WHEN (CASE WHEN cardinality(p_etas) = 1 THEN p_etas[1] ELSE m.eta END) > v_now
                    THEN 'scheduled' ELSE 'queued' END,
               coalesce(CASE WHEN cardinality(p_etas) = 1 THEN p_etas[1] ELSE m.eta END, 0)
        FROM m
        ON CONFLICT (id) DO NOTHING
        RETURNING worq_jobs.id
    )
    SELECT coalesce(array_agg(ins.id), '{}') INTO v_added FROM ins;
    IF cardinality(v_added) < cardinality(p_ids) THEN
        SELECT array_agg(r.id) INTO v_refused
        FROM (SELECT unnest(p_ids) AS id EXCEPT ALL SELECT unnest(v_added)) r;
    END IF;
    IF cardinality(v_added) = 0 THEN
        RETURN v_refused;
    END IF;
    INSERT INTO worq_queues (name)
    SELECT DISTINCT q FROM unnest(p_queues) AS q
    WHERE NOT EXISTS (SELECT 1 FROM worq_queues k WHERE k.name = q)
    ORDER BY q
    ON CONFLICT DO NOTHING;
    IF true = ANY (p_clear) THEN
        DELETE FROM worq_results r
        USING unnest(p_ids, p_clear) AS c(id, clear)
        WHERE (c.clear OR (cardinality(p_clear) = 1 AND p_clear[1]))
          AND c.id IS NOT NULL AND r.id = c.id AND c.id = ANY (v_added);
    END IF;
    FOR v_queue IN SELECT DISTINCT q FROM unnest(p_queues) AS q LOOP
        PERFORM pg_notify(p_channel, v_queue);
    END LOOP;
    RETURN v_refused;
END
$$;

-- Lease up to p_limit due jobs from p_queues, in the order given. Due delayed jobs and
-- expired leases of those queues are moved back to 'queued' first (an expired lease keeps its
-- place, drops its progress, and its next run counts its rate). Rows locked by another fetch
-- are skipped, so concurrent fetches never wait on each other. Jobs unique until started let
-- go of their key here. A queue with no limited job waiting takes the set-based path;
-- otherwise candidates are looked at one by one, in fetch order: a job whose key has no free
-- permit stays queued (parked, keeping its place), a job whose rate slot lies ahead waits
-- for it as 'scheduled' with the slot counted, and at most 200 are set aside per queue and
-- call so that a long run of them cannot stall the jobs behind.
CREATE FUNCTION worq_fetch(
    p_queues text[], p_limit integer, p_lease float8, p_worker text DEFAULT NULL
) RETURNS TABLE (
    r_pos integer, r_id text, r_queue text, r_body bytea, r_token bigint, r_attempts integer,
    r_cancel boolean, r_priority integer, r_seq bigint
)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_now float8 := worq_now();
    v_left integer := p_limit;
    v_pos integer;
    v_got integer;
    v_aside integer;
    v_held integer;
    v_tat float8;
    v_start float8;
    v_c record;
    v_l record;
BEGIN
    UPDATE worq_jobs j SET state = 'queued', seq = nextval('worq_seq')
    FROM (
        SELECT d.id FROM worq_jobs d
        WHERE d.queue = ANY (p_queues) AND d.state IN ('scheduled', 'retrying') AND d.due <= v_now
        ORDER BY d.due
        LIMIT 1000
        FOR UPDATE SKIP LOCKED
    ) s
    WHERE j.id = s.id;
    -- An expired lease keeps its place, drops its progress, and its next run counts its rate.
    UPDATE worq_jobs j
    SET state = 'queued', token = NULL, lease_until = NULL, progress = NULL, granted = false
    FROM (
        SELECT d.id FROM worq_jobs d
        WHERE d.queue = ANY (p_queues) AND d.state = 'running' AND d.lease_until <= v_now
        LIMIT 1000
        FOR UPDATE SKIP LOCKED
    ) s
    WHERE j.id = s.id;
    FOR v_pos IN 1 .. coalesce(array_length(p_queues, 1), 0) LOOP
        EXIT WHEN v_left <= 0;
        IF NOT EXISTS (
            SELECT 1 FROM worq_jobs
            WHERE queue = p_queues[v_pos] AND state = 'queued'
              AND (conc_key IS NOT NULL OR rate_key IS NOT NULL)
        ) THEN
            RETURN QUERY
            WITH picked AS (
                SELECT c.id FROM worq_jobs c
                WHERE c.queue = p_queues[v_pos] AND c.state = 'queued'
                ORDER BY c.priority DESC, c.seq
                LIMIT v_left
                FOR UPDATE SKIP LOCKED
            ), leased AS (
                UPDATE worq_jobs j
                SET state = 'running', attempts = j.attempts + 1, token = nextval('worq_token'),
                    lease_until = v_now + p_lease, progress = NULL, holder = p_worker
                FROM picked
                WHERE j.id = picked.id
                RETURNING j.id, j.queue, j.body, j.token, j.attempts, j.cancel_requested,
                          j.priority, j.seq, j.unique_key, j.unique_until, j.unique_hold
            ), freed AS (  -- data-modifying CTEs always run, whatever the query reads
                DELETE FROM worq_unique u USING leased l
                WHERE l.unique_until = 'started' AND l.unique_hold <= 0 AND u.queue = l.queue
                  AND u.key = l.unique_key AND u.holder = l.id AND u.by_job
            ), held AS (
                UPDATE worq_unique u SET by_job = false, until = v_now + l.unique_hold
                FROM leased l
                WHERE l.unique_until = 'started' AND l.unique_hold > 0 AND u.queue = l.queue
                  AND u.key = l.unique_key AND u.holder = l.id AND u.by_job
            )
            SELECT v_pos, l.id, l.queue, l.body, l.token, l.attempts, l.cancel_requested,
                   l.priority, l.seq
            FROM leased l;
            GET DIAGNOSTICS v_got = ROW_COUNT;
            v_left := v_left - v_got;
            CONTINUE;
        END IF;
        v_aside := 0;
        FOR v_c IN
            SELECT d.id, d.conc_key, d.conc_limit, d.rate_key, d.rate_interval, d.rate_burst,
                   d.granted
            FROM worq_jobs d
            WHERE d.queue = p_queues[v_pos] AND d.state = 'queued'
            ORDER BY d.priority DESC, d.seq
            FOR UPDATE SKIP LOCKED
        LOOP
            EXIT WHEN v_left <= 0 OR v_aside >= 200;
            IF v_c.conc_key IS NOT NULL THEN
                -- One fetch at a time counts a key's permits (until it commits).
                PERFORM pg_advisory_xact_lock(
                    hashtextextended(p_queues[v_pos] || chr(31) || v_c.conc_key, 0));
                SELECT count(*) INTO v_held FROM worq_jobs
                WHERE queue = p_queues[v_pos] AND conc_key = v_c.conc_key AND state = 'running'
                  AND lease_until > v_now;
                IF v_held >= v_c.conc_limit THEN
                    v_aside := v_aside + 1;  -- parked: stays queued, in its place
                    CONTINUE;
                END IF;
            END IF;
            IF v_c.rate_key IS NOT NULL AND NOT v_c.granted THEN
                INSERT INTO worq_rates (queue, key, tat) VALUES (p_queues[v_pos], v_c.rate_key, v_now)
                ON CONFLICT DO NOTHING;
                SELECT tat INTO v_tat FROM worq_rates
                WHERE queue = p_queues[v_pos] AND key = v_c.rate_key FOR UPDATE;
                v_tat := greatest(v_tat, v_now);  -- a TAT in the past means idle
                UPDATE worq_rates SET tat = v_tat + v_c.rate_interval
                WHERE queue = p_queues[v_pos] AND key = v_c.rate_key;
                v_start := greatest(v_now, v_tat - (v_c.rate_burst - 1) * v_c.rate_interval);
                IF v_start > v_now THEN  -- its slot is its own when it comes due
                    UPDATE worq_jobs SET state = 'scheduled', due = v_start, granted = true
                    WHERE id = v_c.id;
                    v_aside := v_aside + 1;
                    CONTINUE;
                END IF;
            END IF;
            UPDATE worq_jobs j
            SET state = 'running', attempts = j.attempts + 1, token = nextval('worq_token'),
                lease_until = v_now + p_lease, progress = NULL, granted = j.rate_key IS NOT NULL,
                holder = p_worker
            WHERE j.id = v_c.id
            RETURNING j.id, j.queue, j.body, j.token, j.attempts, j.cancel_requested,
                      j.priority, j.seq, j.unique_key, j.unique_until, j.unique_hold
            INTO v_l;
            IF v_l.unique_until = 'started' THEN
                PERFORM worq_let_go(v_l.queue, v_l.unique_key, v_l.id, v_l.unique_hold, v_now);
            END IF;
            r_pos := v_pos;
            r_id := v_l.id;
            r_queue := v_l.queue;
            r_body := v_l.body;
            r_token := v_l.token;
            r_attempts := v_l.attempts;
            r_cancel := v_l.cancel_requested;
            r_priority := v_l.priority;
            r_seq := v_l.seq;
            RETURN NEXT;
            v_left := v_left - 1;
        END LOOP;
    END LOOP;
END
$$;

-- When the next job of p_queues comes due (a delayed job, or an expired lease); NULL if
-- none will without an enqueue. An idle fetch sleeps at most until then. (PL/pgSQL, which
-- keeps its plans: a SQL function is planned again at every call.)
CREATE FUNCTION worq_next_due(p_queues text[]) RETURNS float8
LANGUAGE plpgsql STABLE SET search_path FROM CURRENT AS $$
BEGIN
    RETURN least(
        (SELECT min(due) FROM worq_jobs
         WHERE queue = ANY (p_queues) AND state IN ('scheduled', 'retrying')),
        (SELECT min(lease_until) FROM worq_jobs
         WHERE queue = ANY (p_queues) AND state = 'running')
    );
END
$$;

-- Apply settlements; returns, per settlement, whether its token still held the lease.
-- p_outcomes: 'ack' (the job is deleted), 'retry' (queued again, after p_delays, its rate
-- slot dropped) or 'dead'. A record (when the broker stores results) is written in the same
-- transaction, so a job is never settled without its result nor the reverse. A job's unique
-- key held until done is let go at an ack or a dead-letter; a group member is counted (with
-- its output), and the group a job closes is released.
CREATE FUNCTION worq_settle(
    p_channel text, p_ids text[], p_tokens bigint[], p_outcomes text[], p_delays float8[],
    p_reasons text[], p_records bytea[], p_ttls float8[], p_outputs bytea[]
) RETURNS boolean[]
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_now float8 := worq_now();
    v_applied boolean[] := '{}';
    v_queue text;
    v_key text;
    v_until text;
    v_hold float8;
    v_group text;
    v_index integer;
    v_closes text;
    i integer;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_ids, 1), 0) LOOP
        IF p_outcomes[i] = 'ack' THEN
            DELETE FROM worq_jobs
            WHERE id = p_ids[i] AND token = p_tokens[i] AND state = 'running'
              AND lease_until > v_now
            RETURNING queue, unique_key, unique_until, unique_hold, member_group,
                      member_index, closes
            INTO v_queue, v_key, v_until, v_hold, v_group, v_index, v_closes;
        ELSIF p_outcomes[i] = 'retry' THEN
            UPDATE worq_jobs
            SET state = CASE WHEN p_delays[i] > 0 THEN 'retrying' ELSE 'queued' END,
                due = v_now + p_delays[i], seq = nextval('worq_seq'), token = NULL,
                lease_until = NULL, progress = NULL, reason = p_reasons[i], granted = false
            WHERE id = p_ids[i] AND token = p_tokens[i] AND state = 'running'
              AND lease_until > v_now
            RETURNING queue, NULL, NULL, 0, NULL, NULL, NULL
            INTO v_queue, v_key, v_until, v_hold, v_group, v_index, v_closes;
            IF FOUND THEN  -- idle fetches recompute when to wake
                PERFORM pg_notify(p_channel, v_queue);
            END IF;
        ELSE
            UPDATE worq_jobs
            SET state = 'dead', died_at = v_now, token = NULL, lease_until = NULL,
                progress = NULL, cancel_requested = false, reason = p_reasons[i]
            WHERE id = p_ids[i] AND token = p_tokens[i] AND state = 'running'
              AND lease_until > v_now
            RETURNING queue, unique_key, unique_until, unique_hold, member_group,
                      member_index, closes
            INTO v_queue, v_key, v_until, v_hold, v_group, v_index, v_closes;
        END IF;
        v_applied := v_applied || FOUND;
        IF NOT FOUND THEN
            CONTINUE;
        END IF;
        IF v_key IS NOT NULL AND v_until = 'done' THEN
            PERFORM worq_let_go(v_queue, v_key, p_ids[i], v_hold, v_now);
        END IF;
        IF p_records[i] IS NOT NULL THEN
            INSERT INTO worq_results (id, data, expires)
            VALUES (p_ids[i], p_records[i], v_now + p_ttls[i])
            ON CONFLICT (id) DO UPDATE SET data = excluded.data, expires = excluded.expires;
            PERFORM pg_notify(p_channel || '_results', p_ids[i]);
        END IF;
        IF v_group IS NOT NULL OR v_closes IS NOT NULL THEN
            PERFORM worq_end_member(p_channel, v_group, v_index, v_closes,
                                    p_outcomes[i] = 'dead', p_outputs[i], v_now);
        END IF;
    END LOOP;
    RETURN v_applied;
END
$$;

-- Renew leases; per delivery 'held', 'cancelling' or 'lost'. Progress is kept for held ones.
CREATE FUNCTION worq_extend(
    p_ids text[], p_tokens bigint[], p_lease float8, p_progress bytea[]
) RETURNS text[]
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_now float8 := worq_now();
    v_states text[] := '{}';
    v_cancel boolean;
    i integer;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_ids, 1), 0) LOOP
        UPDATE worq_jobs
        SET lease_until = v_now + p_lease, progress = coalesce(p_progress[i], progress)
        WHERE id = p_ids[i] AND token = p_tokens[i] AND state = 'running'
          AND lease_until > v_now
        RETURNING cancel_requested INTO v_cancel;
        v_states := v_states || CASE
            WHEN NOT FOUND THEN 'lost' WHEN v_cancel THEN 'cancelling' ELSE 'held' END;
    END LOOP;
    RETURN v_states;
END
$$;

-- Renew every unexpired lease of p_queues fetched for p_worker (worq_fetch's p_worker): one
-- call for all of a worker's leases, fenced as worq_extend (a settled, released or re-leased
-- job is no longer its lease). Answers each renewed lease's token and cancel flag; progress
-- (p_ids, p_progress) is kept for renewed ones.
CREATE FUNCTION worq_extend_worker(
    p_worker text, p_queues text[], p_lease float8, p_ids text[], p_progress bytea[]
) RETURNS TABLE (r_token bigint, r_cancel boolean)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_now float8 := worq_now();
BEGIN
    RETURN QUERY
    UPDATE worq_jobs j
    SET lease_until = v_now + p_lease,
        progress = coalesce(
            (SELECT p.data FROM unnest(p_ids, p_progress) AS p (id, data) WHERE p.id = j.id),
            j.progress)
    WHERE j.queue = ANY (p_queues) AND j.state = 'running' AND j.holder = p_worker
      AND j.lease_until > v_now
    RETURNING j.token, j.cancel_requested;
END
$$;

-- Hand back unstarted deliveries: their place (seq) is kept and their attempt uncounted,
-- except that a limited job hands its permit to the jobs of its key parked before it and
-- goes behind them.
CREATE FUNCTION worq_release(p_channel text, p_ids text[], p_tokens bigint[])
RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_now float8 := worq_now();
    v_queue text;
BEGIN
    FOR v_queue IN
        UPDATE worq_jobs j
        SET state = 'queued', attempts = j.attempts - 1, token = NULL, lease_until = NULL,
            progress = NULL,
            seq = CASE WHEN j.conc_key IS NOT NULL AND EXISTS (
                      SELECT 1 FROM worq_jobs o
                      WHERE o.queue = j.queue AND o.conc_key = j.conc_key
                        AND o.state = 'queued' AND o.id <> j.id)
                  THEN nextval('worq_seq') ELSE j.seq END
        FROM unnest(p_ids, p_tokens) AS d(id, token)
        WHERE j.id = d.id AND j.token = d.token AND j.state = 'running' AND j.lease_until > v_now
        RETURNING j.queue
    LOOP
        PERFORM pg_notify(p_channel, v_queue);
    END LOOP;
END
$$;

-- Cancel: remove a waiting job (writing its record, letting go of its unique key, counting
-- a group member as failed and releasing the group it closes), flag a running one;
-- 'removed', 'requested' or 'not_found'.
CREATE FUNCTION worq_cancel(p_channel text, p_id text, p_record bytea, p_ttl float8)
RETURNS text
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_now float8 := worq_now();
    v_state text;
    v_lease float8;
    v_queue text;
    v_key text;
    v_hold float8;
    v_group text;
    v_index integer;
    v_closes text;
BEGIN
    SELECT state, lease_until, queue, unique_key, unique_hold, member_group, member_index, closes
    INTO v_state, v_lease, v_queue, v_key, v_hold, v_group, v_index, v_closes
    FROM worq_jobs WHERE id = p_id FOR UPDATE;
    IF NOT FOUND OR v_state = 'dead' THEN
        RETURN 'not_found';
    END IF;
    IF v_state = 'running' AND v_lease > v_now THEN
        UPDATE worq_jobs SET cancel_requested = true WHERE id = p_id;
        RETURN 'requested';
    END IF;
    DELETE FROM worq_jobs WHERE id = p_id;
    PERFORM worq_let_go(v_queue, v_key, p_id, v_hold, v_now);
    IF p_record IS NOT NULL THEN
        INSERT INTO worq_results (id, data, expires) VALUES (p_id, p_record, v_now + p_ttl)
        ON CONFLICT (id) DO UPDATE SET data = excluded.data, expires = excluded.expires;
        PERFORM pg_notify(p_channel || '_results', p_id);
    END IF;
    IF v_group IS NOT NULL OR v_closes IS NOT NULL THEN
        PERFORM worq_end_member(p_channel, v_group, v_index, v_closes, true, NULL, v_now);
    END IF;
    RETURN 'removed';
END
$$;

-- Store records (a storage used on its own), waking waiters.
CREATE FUNCTION worq_save(p_channel text, p_ids text[], p_records bytea[], p_ttl float8)
RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_id text;
BEGIN
    INSERT INTO worq_results (id, data, expires)
    SELECT r.id, r.data, worq_now() + p_ttl FROM unnest(p_ids, p_records) AS r(id, data)
    ON CONFLICT (id) DO UPDATE SET data = excluded.data, expires = excluded.expires;
    FOREACH v_id IN ARRAY p_ids LOOP
        PERFORM pg_notify(p_channel || '_results', v_id);
    END LOOP;
END
$$;

-- Record a tick (when the recorded last fire is p_last, NULL: none yet); true if it was.
-- The caller enqueues the tick's job in the same transaction.
CREATE FUNCTION worq_fire_schedule(p_name text, p_tick float8, p_last float8) RETURNS boolean
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF p_last IS NULL THEN
        INSERT INTO worq_schedules (name, last_fire) VALUES (p_name, p_tick)
        ON CONFLICT (name) DO NOTHING;
    ELSE
        UPDATE worq_schedules SET last_fire = p_tick
        WHERE name = p_name AND last_fire = p_last;
    END IF;
    RETURN FOUND;
END
$$;

-- The job p_id reached its key's ``until``: the key stays taken p_hold seconds more (or is
-- free at once). Nothing happens if the job no longer holds it.
CREATE FUNCTION worq_let_go(p_queue text, p_key text, p_id text, p_hold float8, p_now float8)
RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF p_key IS NULL THEN
        RETURN;
    END IF;
    IF p_hold > 0 THEN
        UPDATE worq_unique SET by_job = false, until = p_now + p_hold
        WHERE queue = p_queue AND key = p_key AND holder = p_id AND by_job;
    ELSE
        DELETE FROM worq_unique
        WHERE queue = p_queue AND key = p_key AND holder = p_id AND by_job;
    END IF;
END
$$;

-- Enqueue one message after the other, honouring unique keys and recording group membership
-- and limits; per message NULL if added, else the id of the job standing for it. A unique
-- key is taken by an insert into worq_unique; a conflicting holder still held answers with
-- its id, and the new row is deleted unseen. (worq_enqueue is the set-based path for plain
-- messages.)
CREATE FUNCTION worq_add(
    p_channel text, p_ids text[], p_queues text[], p_bodies bytea[], p_priorities integer[],
    p_etas float8[], p_clear boolean[], p_keys text[], p_untils text[], p_holds float8[],
    p_groups text[], p_indexes integer[], p_closes text[], p_rate_keys text[],
    p_rate_intervals float8[], p_rate_bursts integer[], p_conc_keys text[],
    p_conc_limits integer[]
) RETURNS text[]
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_now float8 := worq_now();
    v_holders text[] := '{}';
    v_holder text;
    v_by_job boolean;
    v_until float8;
    v_queue text;
    i integer;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_ids, 1), 0) LOOP
        INSERT INTO worq_jobs (id, queue, body, priority, seq, state, due, unique_key,
                               unique_until, unique_hold, member_group, member_index, closes,
                               rate_key, rate_interval, rate_burst, conc_key, conc_limit)
        VALUES (p_ids[i], p_queues[i], p_bodies[i], p_priorities[i], nextval('worq_seq'),
                CASE WHEN p_etas[i] IS NOT NULL AND p_etas[i] > v_now
                     THEN 'scheduled' ELSE 'queued' END,
                coalesce(p_etas[i], 0), p_keys[i], p_untils[i], coalesce(p_holds[i], 0),
                p_groups[i], p_indexes[i], p_closes[i], p_rate_keys[i], p_rate_intervals[i],
                p_rate_bursts[i], p_conc_keys[i], p_conc_limits[i])
        ON CONFLICT (id) DO NOTHING;
        IF NOT FOUND THEN
            v_holders := v_holders || p_ids[i];
            CONTINUE;
        END IF;
        IF p_keys[i] IS NOT NULL THEN
            INSERT INTO worq_unique (queue, key, holder, by_job)
            VALUES (p_queues[i], p_keys[i], p_ids[i], true)
            ON CONFLICT DO NOTHING;
            IF NOT FOUND THEN
                SELECT holder, by_job, until INTO v_holder, v_by_job, v_until
                FROM worq_unique WHERE queue = p_queues[i] AND key = p_keys[i] FOR UPDATE;
                IF (v_by_job AND EXISTS (
                        SELECT 1 FROM worq_jobs
                        WHERE id = v_holder AND queue = p_queues[i] AND unique_key = p_keys[i]))
                   OR (NOT v_by_job AND v_until > v_now) THEN
                    DELETE FROM worq_jobs WHERE id = p_ids[i];  -- never seen: same transaction
                    v_holders := v_holders || v_holder;
                    CONTINUE;
                END IF;
                UPDATE worq_unique SET holder = p_ids[i], by_job = true, until = 0
                WHERE queue = p_queues[i] AND key = p_keys[i];
            END IF;
        END IF;
        v_holders := v_holders || NULL::text;
        INSERT INTO worq_queues (name) VALUES (p_queues[i]) ON CONFLICT DO NOTHING;
        IF p_clear[i] THEN
            DELETE FROM worq_results WHERE id = p_ids[i];
        END IF;
    END LOOP;
    FOR v_queue IN SELECT DISTINCT q FROM unnest(p_queues) AS q LOOP
        PERFORM pg_notify(p_channel, v_queue);
    END LOOP;
    RETURN v_holders;
END
$$;

-- Every index of the group is counted: start its ttl and send its callback (unless a member
-- failed and the group does not run on failure).
CREATE FUNCTION worq_complete_group(p_channel text, p_id text, p_now float8) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    g worq_groups;
BEGIN
    SELECT * INTO g FROM worq_groups WHERE id = p_id FOR UPDATE;
    IF g.cb_id IS NOT NULL AND (cardinality(g.failed) = 0 OR g.run_on_failure) THEN
        PERFORM worq_add(p_channel, ARRAY[g.cb_id], ARRAY[g.cb_queue], ARRAY[g.cb_body],
                         ARRAY[g.cb_priority], ARRAY[g.cb_eta], ARRAY[g.cb_clear],
                         ARRAY[NULL::text], ARRAY[NULL::text], ARRAY[0::float8],
                         ARRAY[g.cb_group], ARRAY[g.cb_index], ARRAY[g.cb_closes],
                         ARRAY[NULL::text], ARRAY[NULL::float8], ARRAY[NULL::integer],
                         ARRAY[NULL::text], ARRAY[NULL::integer]);
        UPDATE worq_groups SET expires = p_now + ttl, callback_sent = true WHERE id = p_id;
    ELSE
        UPDATE worq_groups SET expires = p_now + ttl WHERE id = p_id;
    END IF;
END
$$;

-- A job with ``member`` or ``closes`` ended (acked, dead, or removed by cancel): count its
-- index once, complete the group if it was the last, then release the group it closes.
CREATE FUNCTION worq_end_member(
    p_channel text, p_group text, p_index integer, p_closes text, p_failed boolean,
    p_output bytea, p_now float8
) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_finished integer;
    v_size integer;
BEGIN
    IF p_group IS NOT NULL THEN
        UPDATE worq_groups
        SET finished = finished || p_index,
            failed = CASE WHEN p_failed THEN failed || p_index ELSE failed END,
            outputs[p_index + 1] = p_output
        WHERE id = p_group AND p_index >= 0 AND p_index < size
          AND NOT (p_index = ANY (finished))
          AND (expires IS NULL OR expires > p_now)
        RETURNING cardinality(finished), size INTO v_finished, v_size;
        IF FOUND AND v_finished = v_size THEN
            PERFORM worq_complete_group(p_channel, p_group, p_now);
        END IF;
    END IF;
    IF p_closes IS NOT NULL THEN
        DELETE FROM worq_groups WHERE id = p_closes;
    END IF;
END
$$;

-- Drop dead jobs past retention: those of every queue dead for longer than p_max_age, and
-- those of p_queues beyond their newest p_max_count; at most p_limit rows (NULL: no bound).
-- Returns how many went. A dead job has let go of its unique key and been counted in its
-- group already, so nothing else changes; a row requeued meanwhile is not dead and stays.
CREATE FUNCTION worq_trim_dead(
    p_queues text[], p_max_count bigint, p_max_age float8, p_limit integer
) RETURNS integer
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_cutoff float8 := worq_now() - p_max_age;
    v_gone integer;
    v_total integer := 0;
    v_queue text;
BEGIN
    DELETE FROM worq_jobs j
    WHERE j.id IN (
        SELECT d.id FROM worq_jobs d
        WHERE d.state = 'dead' AND d.died_at < v_cutoff
        ORDER BY d.died_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ) AND j.state = 'dead';
    GET DIAGNOSTICS v_total = ROW_COUNT;
    FOREACH v_queue IN ARRAY coalesce(p_queues, '{}') LOOP
        EXIT WHEN p_limit IS NOT NULL AND v_total >= p_limit;
        -- Most queues hold fewer than their bound: counting up to it reads the index alone.
        CONTINUE WHEN (
            SELECT count(*) FROM (
                SELECT 1 FROM worq_jobs
                WHERE queue = v_queue AND state = 'dead'
                LIMIT p_max_count + 1
            ) n
        ) <= p_max_count;
        DELETE FROM worq_jobs j
        WHERE j.id IN (
            SELECT d.id FROM worq_jobs d
            WHERE d.queue = v_queue AND d.state = 'dead'
            ORDER BY d.died_at DESC, d.seq DESC
            OFFSET p_max_count
            LIMIT p_limit - v_total
            FOR UPDATE SKIP LOCKED
        ) AND j.state = 'dead';
        GET DIAGNOSTICS v_gone = ROW_COUNT;
        v_total := v_total + v_gone;
    END LOOP;
    RETURN v_total;
END
$$;

-- The first row carries the settlement (per settlement, whether its token still held the
-- lease) and, when nothing was leased and p_wait, when the next job of p_queues comes due
-- (NULL: none without an enqueue) with the server's time; every later row is one leased job,
-- as worq_fetch returns it. Follow-ups (Settlement.then) are not handled here: a caller with
-- follow-ups settles on a transaction of its own.
CREATE FUNCTION worq_settle_fetch(
    p_channel text, p_ids text[], p_tokens bigint[], p_outcomes text[], p_delays float8[],
    p_reasons text[], p_records bytea[], p_ttls float8[], p_outputs bytea[],
    p_queues text[], p_limit integer, p_lease float8, p_wait boolean,
    p_worker text DEFAULT NULL
) RETURNS TABLE (
    r_applied boolean[], r_next_due float8, r_now float8,
    r_pos integer, r_id text, r_queue text, r_body bytea, r_token bigint, r_attempts integer,
    r_cancel boolean, r_priority integer, r_seq bigint
)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_got integer;
BEGIN
    r_applied := '{}';
    IF cardinality(p_ids) > 0 THEN
        r_applied := worq_settle(p_channel, p_ids, p_tokens, p_outcomes, p_delays, p_reasons,
                                 p_records, p_ttls, p_outputs);
    END IF;
    RETURN QUERY
    SELECT NULL::boolean[], NULL::float8, NULL::float8, f.*
    FROM worq_fetch(p_queues, p_limit, p_lease, p_worker) f;
    GET DIAGNOSTICS v_got = ROW_COUNT;
    IF v_got = 0 AND p_wait THEN
        r_next_due := worq_next_due(p_queues);
        r_now := worq_now();
    END IF;
    RETURN NEXT;  -- the settlement's row; the caller tells it by its r_applied
END
$$;
