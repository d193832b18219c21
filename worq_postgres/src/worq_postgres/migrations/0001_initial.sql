-- worq-postgres schema, version 1: jobs, results, queues, workers, and the functions that
-- change them. Applied by worq_postgres.migrate() with search_path set to the target schema,
-- so every name here is unqualified. Times are Unix seconds from the server's clock.

CREATE FUNCTION worq_now() RETURNS float8
LANGUAGE sql VOLATILE AS $$ SELECT extract(epoch FROM clock_timestamp())::float8 $$;

CREATE SEQUENCE worq_seq;    -- FIFO order within a priority level
CREATE SEQUENCE worq_token;  -- lease tokens: every fetch takes a fresh one

-- Every job the broker holds, in any state. Acknowledged and cancelled jobs are deleted.
-- state: 'queued' (ready), 'scheduled' (eta), 'retrying' (backoff), 'running' (leased),
-- 'dead'. A scheduled/retrying job whose due time passed, or a running one whose lease ran
-- out, reads as queued and is moved back by the next fetch.
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
    died_at float8
) WITH (fillfactor = 80);  -- room for HOT updates: state changes rewrite the row in place

-- Fetch reads only this small partial index, however many other rows the table holds.
CREATE INDEX worq_jobs_ready ON worq_jobs (queue, priority DESC, seq) WHERE state = 'queued';
CREATE INDEX worq_jobs_waiting ON worq_jobs (queue, due) WHERE state IN ('scheduled', 'retrying');
CREATE INDEX worq_jobs_leased ON worq_jobs (queue, lease_until) WHERE state = 'running';
CREATE INDEX worq_jobs_dead ON worq_jobs (queue, died_at) WHERE state = 'dead';

-- Queues that ever held a job, for stats() without a queue list.
CREATE TABLE worq_queues (name text PRIMARY KEY);

-- Job records (results, final errors, cancellations) with their expiry.
CREATE TABLE worq_results (
    id text PRIMARY KEY,
    data bytea NOT NULL,
    expires float8 NOT NULL
);
CREATE INDEX worq_results_expires ON worq_results (expires);

CREATE TABLE worq_workers (
    id text PRIMARY KEY,
    info jsonb NOT NULL,
    expires float8 NOT NULL
);

-- Every function runs with the search_path it was created under (SET ... FROM CURRENT), so
-- it finds its own tables whatever the caller's search_path is (transactional enqueue runs
-- on the application's own connection).

-- Enqueue a batch, all or nothing; returns the ids it added. An id already held (in any
-- state, any queue) is left alone; the first of two equal ids in the batch wins. Added jobs
-- flagged in p_clear have their old record deleted in the same transaction. Wakes idle
-- workers through NOTIFY, which PostgreSQL delivers only when the transaction commits.
CREATE FUNCTION worq_enqueue(
    p_channel text, p_ids text[], p_queues text[], p_bodies bytea[], p_priorities integer[],
    p_etas float8[], p_clear boolean[]
) RETURNS SETOF text
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_now float8 := worq_now();
    v_added text[];
    v_queue text;
BEGIN
    WITH m AS (
        SELECT * FROM unnest(p_ids, p_queues, p_bodies, p_priorities, p_etas)
            WITH ORDINALITY AS m(id, queue, body, priority, eta, ord)
        ORDER BY ord
    ), ins AS (
        INSERT INTO worq_jobs (id, queue, body, priority, seq, state, due)
        SELECT m.id, m.queue, m.body, m.priority, nextval('worq_seq'),
               CASE WHEN m.eta IS NOT NULL AND m.eta > v_now THEN 'scheduled' ELSE 'queued' END,
               coalesce(m.eta, 0)
        FROM m
        ON CONFLICT (id) DO NOTHING
        RETURNING worq_jobs.id, worq_jobs.queue, worq_jobs.state
    )
    SELECT array_agg(ins.id) INTO v_added FROM ins;
    IF v_added IS NULL THEN
        RETURN;
    END IF;
    INSERT INTO worq_queues (name)
    SELECT DISTINCT q FROM unnest(p_queues) AS q ORDER BY q
    ON CONFLICT DO NOTHING;
    DELETE FROM worq_results r
    USING unnest(p_ids, p_clear) AS c(id, clear)
    WHERE c.clear AND r.id = c.id AND c.id = ANY (v_added);
    FOR v_queue IN SELECT DISTINCT q FROM unnest(p_queues) AS q LOOP
        PERFORM pg_notify(p_channel, v_queue);
    END LOOP;
    RETURN QUERY SELECT unnest(v_added);
END
$$;

-- Lease up to p_limit due jobs from p_queues, in the order given. Due delayed jobs and
-- expired leases of those queues are moved back to 'queued' first. Rows locked by another
-- fetch are skipped, so concurrent fetches never wait on each other.
CREATE FUNCTION worq_fetch(p_queues text[], p_limit integer, p_lease float8)
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
    -- An expired lease keeps its place in the queue (its seq) and drops its progress.
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
        )
        UPDATE worq_jobs j
        SET state = 'running', attempts = j.attempts + 1, token = nextval('worq_token'),
            lease_until = v_now + p_lease, progress = NULL
        FROM picked
        WHERE j.id = picked.id
        RETURNING v_pos, j.id, j.queue, j.body, j.token, j.attempts, j.cancel_requested,
                  j.priority, j.seq;
        GET DIAGNOSTICS v_got = ROW_COUNT;
        v_left := v_left - v_got;
    END LOOP;
END
$$;

-- When the next job of p_queues comes due (a delayed job, or an expired lease); NULL if
-- none will without an enqueue. An idle fetch sleeps at most until then.
CREATE FUNCTION worq_next_due(p_queues text[]) RETURNS float8
LANGUAGE sql STABLE SET search_path FROM CURRENT AS $$
    SELECT least(
        (SELECT min(due) FROM worq_jobs
         WHERE queue = ANY (p_queues) AND state IN ('scheduled', 'retrying')),
        (SELECT min(lease_until) FROM worq_jobs
         WHERE queue = ANY (p_queues) AND state = 'running')
    )
$$;

-- Apply settlements; returns, per settlement, whether its token still held the lease.
-- p_outcomes: 'ack', 'retry' or 'dead'. A record (when the broker stores results) is written
-- in the same transaction, so a job is never settled without its result nor the reverse.
CREATE FUNCTION worq_settle(
    p_channel text, p_ids text[], p_tokens bigint[], p_outcomes text[], p_delays float8[],
    p_reasons text[], p_records bytea[], p_ttls float8[]
) RETURNS boolean[]
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_now float8 := worq_now();
    v_applied boolean[] := '{}';
    v_queue text;
    i integer;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_ids, 1), 0) LOOP
        IF p_outcomes[i] = 'ack' THEN
            DELETE FROM worq_jobs
            WHERE id = p_ids[i] AND token = p_tokens[i] AND state = 'running'
              AND lease_until > v_now
            RETURNING queue INTO v_queue;
        ELSIF p_outcomes[i] = 'retry' THEN
            UPDATE worq_jobs
            SET state = CASE WHEN p_delays[i] > 0 THEN 'retrying' ELSE 'queued' END,
                due = v_now + p_delays[i], seq = nextval('worq_seq'), token = NULL,
                lease_until = NULL, progress = NULL, reason = p_reasons[i]
            WHERE id = p_ids[i] AND token = p_tokens[i] AND state = 'running'
              AND lease_until > v_now
            RETURNING queue INTO v_queue;
            IF FOUND THEN  -- idle fetches recompute when to wake
                PERFORM pg_notify(p_channel, v_queue);
            END IF;
        ELSE
            UPDATE worq_jobs
            SET state = 'dead', died_at = v_now, token = NULL, lease_until = NULL,
                progress = NULL, cancel_requested = false, reason = p_reasons[i]
            WHERE id = p_ids[i] AND token = p_tokens[i] AND state = 'running'
              AND lease_until > v_now
            RETURNING queue INTO v_queue;
        END IF;
        v_applied := v_applied || FOUND;
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

-- Hand back unstarted deliveries: their place (seq) is kept and their attempt uncounted.
CREATE FUNCTION worq_release(p_channel text, p_ids text[], p_tokens bigint[]) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_now float8 := worq_now();
    v_queue text;
BEGIN
    FOR v_queue IN
        UPDATE worq_jobs j
        SET state = 'queued', attempts = j.attempts - 1, token = NULL, lease_until = NULL,
            progress = NULL
        FROM unnest(p_ids, p_tokens) AS d(id, token)
        WHERE j.id = d.id AND j.token = d.token AND j.state = 'running' AND j.lease_until > v_now
        RETURNING j.queue
    LOOP
        PERFORM pg_notify(p_channel, v_queue);
    END LOOP;
END
$$;

-- Cancel: remove a waiting job (writing its record), flag a running one; 'removed',
-- 'requested' or 'not_found'.
CREATE FUNCTION worq_cancel(p_channel text, p_id text, p_record bytea, p_ttl float8)
RETURNS text
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_now float8 := worq_now();
    v_state text;
    v_lease float8;
BEGIN
    SELECT state, lease_until INTO v_state, v_lease FROM worq_jobs WHERE id = p_id FOR UPDATE;
    IF NOT FOUND OR v_state = 'dead' THEN
        RETURN 'not_found';
    END IF;
    IF v_state = 'running' AND v_lease > v_now THEN
        UPDATE worq_jobs SET cancel_requested = true WHERE id = p_id;
        RETURN 'requested';
    END IF;
    DELETE FROM worq_jobs WHERE id = p_id;
    IF p_record IS NOT NULL THEN
        INSERT INTO worq_results (id, data, expires) VALUES (p_id, p_record, v_now + p_ttl)
        ON CONFLICT (id) DO UPDATE SET data = excluded.data, expires = excluded.expires;
        PERFORM pg_notify(p_channel || '_results', p_id);
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
