-- worq-postgres schema, version 3: unique jobs.

-- A unique job carries its key, when it lets go of it ('started' or 'done') and for how long
-- the key stays taken after that (hold_for).
ALTER TABLE worq_jobs
    ADD COLUMN unique_key text,
    ADD COLUMN unique_until text,
    ADD COLUMN unique_hold float8 NOT NULL DEFAULT 0;

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

-- Enqueue honouring unique keys, one message after the other (a message added holds its key
-- for the ones after it); per message NULL if added, else the id of the job standing for it.
CREATE FUNCTION worq_enqueue_unique(
    p_channel text, p_ids text[], p_queues text[], p_bodies bytea[], p_priorities integer[],
    p_etas float8[], p_clear boolean[], p_keys text[], p_untils text[], p_holds float8[]
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
                               unique_until, unique_hold)
        VALUES (p_ids[i], p_queues[i], p_bodies[i], p_priorities[i], nextval('worq_seq'),
                CASE WHEN p_etas[i] IS NOT NULL AND p_etas[i] > v_now
                     THEN 'scheduled' ELSE 'queued' END,
                coalesce(p_etas[i], 0), p_keys[i], p_untils[i], coalesce(p_holds[i], 0))
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

-- Fetch, now letting go of the keys of jobs unique until started at their first fetch.
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
    UPDATE worq_jobs j SET state = 'queued', token = NULL, lease_until = NULL, progress = NULL
    FROM (
        SELECT d.id FROM worq_jobs d
        WHERE d.queue = ANY (p_queues) AND d.state = 'running' AND d.lease_until <= v_now
        LIMIT 1000
        FOR UPDATE SKIP LOCKED
    ) s
    WHERE j.id = s.id;
    FOR v_pos IN 1 .. coalesce(array_length(p_queues, 1), 0) LOOP
        EXIT WHEN v_left <= 0;
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
    END LOOP;
END
$$;

-- Settle, now letting go of unique keys held until done (at an ack or a dead-letter).
CREATE OR REPLACE FUNCTION worq_settle(
    p_channel text, p_ids text[], p_tokens bigint[], p_outcomes text[], p_delays float8[],
    p_reasons text[], p_records bytea[], p_ttls float8[]
) RETURNS boolean[]
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_now float8 := worq_now();
    v_applied boolean[] := '{}';
    v_queue text;
    v_key text;
    v_until text;
    v_hold float8;
    i integer;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_ids, 1), 0) LOOP
        IF p_outcomes[i] = 'ack' THEN
            DELETE FROM worq_jobs
            WHERE id = p_ids[i] AND token = p_tokens[i] AND state = 'running'
              AND lease_until > v_now
            RETURNING queue, unique_key, unique_until, unique_hold
            INTO v_queue, v_key, v_until, v_hold;
        ELSIF p_outcomes[i] = 'retry' THEN
            UPDATE worq_jobs
            SET state = CASE WHEN p_delays[i] > 0 THEN 'retrying' ELSE 'queued' END,
                due = v_now + p_delays[i], seq = nextval('worq_seq'), token = NULL,
                lease_until = NULL, progress = NULL, reason = p_reasons[i]
            WHERE id = p_ids[i] AND token = p_tokens[i] AND state = 'running'
              AND lease_until > v_now
            RETURNING queue, NULL, NULL, 0 INTO v_queue, v_key, v_until, v_hold;
            IF FOUND THEN  -- idle fetches recompute when to wake
                PERFORM pg_notify(p_channel, v_queue);
            END IF;
        ELSE
            UPDATE worq_jobs
            SET state = 'dead', died_at = v_now, token = NULL, lease_until = NULL,
                progress = NULL, cancel_requested = false, reason = p_reasons[i]
            WHERE id = p_ids[i] AND token = p_tokens[i] AND state = 'running'
              AND lease_until > v_now
            RETURNING queue, unique_key, unique_until, unique_hold
            INTO v_queue, v_key, v_until, v_hold;
        END IF;
        v_applied := v_applied || FOUND;
        IF FOUND AND v_key IS NOT NULL AND v_until = 'done' THEN
            PERFORM worq_let_go(v_queue, v_key, p_ids[i], v_hold, v_now);
        END IF;
        IF FOUND AND p_records[i] IS NOT NULL THEN
            INSERT INTO worq_results (id, data, expires)
            VALUES (p_ids[i], p_records[i], v_now + p_ttls[i])
            ON CONFLICT (id) DO UPDATE SET data = excluded.data, expires = excluded.expires;
            PERFORM pg_notify(p_channel || '_results', p_ids[i]);
        END IF;
    END LOOP;
    RETURN v_applied;
END
$$;

-- Cancel, now letting go of a removed job's unique key.
CREATE OR REPLACE FUNCTION worq_cancel(p_channel text, p_id text, p_record bytea, p_ttl float8)
RETURNS text
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_now float8 := worq_now();
    v_state text;
    v_lease float8;
    v_queue text;
    v_key text;
    v_hold float8;
BEGIN
    SELECT state, lease_until, queue, unique_key, unique_hold
    INTO v_state, v_lease, v_queue, v_key, v_hold
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
    RETURN 'removed';
END
$$;
