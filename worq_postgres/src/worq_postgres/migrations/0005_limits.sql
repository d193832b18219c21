-- worq-postgres schema, version 5: rate limits (GCRA) and concurrency limits, counted at fetch.

-- A limited job carries its limits; ``granted``: its rate slot is counted for this run (set
-- when it is leased or set aside for a slot; cleared by a retry or an expired lease).
ALTER TABLE worq_jobs
    ADD COLUMN rate_key text,
    ADD COLUMN rate_interval float8,
    ADD COLUMN rate_burst integer,
    ADD COLUMN conc_key text,
    ADD COLUMN conc_limit integer,
    ADD COLUMN granted boolean NOT NULL DEFAULT false;

-- Permits are leases: the running jobs of a key whose lease still holds.
CREATE INDEX worq_jobs_permits ON worq_jobs (queue, conc_key)
    WHERE state = 'running' AND conc_key IS NOT NULL;
-- Whether a queue has limited jobs waiting at all (else fetch takes its set-based path).
CREATE INDEX worq_jobs_limited ON worq_jobs (queue)
    WHERE state = 'queued' AND (conc_key IS NOT NULL OR rate_key IS NOT NULL);

-- Each rate key's theoretical arrival time, per queue (GCRA).
CREATE TABLE worq_rates (
    queue text NOT NULL,
    key text NOT NULL,
    tat float8 NOT NULL,
    PRIMARY KEY (queue, key)
);

DROP FUNCTION worq_add(
    text, text[], text[], bytea[], integer[], float8[], boolean[], text[], text[], float8[],
    text[], integer[], text[]);

-- Enqueue one message after the other, now with limits; see version 4.
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


CREATE OR REPLACE FUNCTION worq_complete_group(p_channel text, p_id text, p_now float8) RETURNS void
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

-- Settle, now dropping a retried job's rate slot: its next run counts again.
CREATE OR REPLACE FUNCTION worq_settle(
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

-- Fetch, now honouring limits. A queue with no limited job waiting takes the set-based path;
-- otherwise candidates are looked at one by one, in fetch order: a job whose key has no free
-- permit stays queued (parked, keeping its place), a job whose rate slot lies ahead waits
-- for it as 'scheduled' with the slot counted, and at most 200 are set aside per queue and
-- call so that a long run of them cannot stall the jobs behind.
CREATE OR REPLACE FUNCTION worq_fetch(p_queues text[], p_limit integer, p_lease float8)
RETURNS TABLE (
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
                    lease_until = v_now + p_lease, progress = NULL
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
                lease_until = v_now + p_lease, progress = NULL, granted = j.rate_key IS NOT NULL
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


-- Release, now handing a limited job's permit to the jobs of its key parked before it: it
-- goes behind them (any other released job keeps its place at the front).
CREATE OR REPLACE FUNCTION worq_release(p_channel text, p_ids text[], p_tokens bigint[])
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
