-- worq-postgres schema, version 8: fewer round trips and less work per job.
--
-- * A worker's step (settle the job it ran, lease the next) is one call, worq_settle_fetch:
--   one round trip and one implicit transaction instead of BEGIN, two calls and COMMIT. An
--   idle look gets, in the same call, when the next job comes due.
-- * worq_next_due is PL/pgSQL: a SQL-language function is planned again at every call (about
--   half a millisecond here), a PL/pgSQL one keeps its plans.
-- * worq_enqueue of a single job takes plain statements instead of the set-based path (about
--   1.6 times the calls per second), registers its queue only when it is new, and looks at
--   worq_results only when a record is to be cleared.

CREATE OR REPLACE FUNCTION worq_next_due(p_queues text[]) RETURNS float8
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

-- The first row carries the settlement (per settlement, whether its token still held the
-- lease) and, when nothing was leased and p_wait, when the next job of p_queues comes due
-- (NULL: none without an enqueue) with the server's time; every later row is one leased job,
-- as worq_fetch returns it. Follow-ups (Settlement.then) are not handled here: a caller with
-- follow-ups settles on a transaction of its own.
CREATE FUNCTION worq_settle_fetch(
    p_channel text, p_ids text[], p_tokens bigint[], p_outcomes text[], p_delays float8[],
    p_reasons text[], p_records bytea[], p_ttls float8[], p_outputs bytea[],
    p_queues text[], p_limit integer, p_lease float8, p_wait boolean
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
    FROM worq_fetch(p_queues, p_limit, p_lease) f;
    GET DIAGNOSTICS v_got = ROW_COUNT;
    IF v_got = 0 AND p_wait THEN
        r_next_due := worq_next_due(p_queues);
        r_now := worq_now();
    END IF;
    RETURN NEXT;  -- the settlement's row; the caller tells it by its r_applied
END
$$;

CREATE OR REPLACE FUNCTION worq_enqueue(
    p_channel text, p_ids text[], p_queues text[], p_bodies bytea[], p_priorities integer[],
    p_etas float8[], p_clear boolean[]
) RETURNS SETOF text
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_now float8 := worq_now();
    v_added text[];
    v_queue text;
BEGIN
    IF cardinality(p_ids) = 1 THEN
        INSERT INTO worq_jobs (id, queue, body, priority, seq, state, due)
        VALUES (p_ids[1], p_queues[1], p_bodies[1], p_priorities[1], nextval('worq_seq'),
                CASE WHEN p_etas[1] > v_now THEN 'scheduled' ELSE 'queued' END,
                coalesce(p_etas[1], 0))
        ON CONFLICT (id) DO NOTHING;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        IF NOT EXISTS (SELECT 1 FROM worq_queues WHERE name = p_queues[1]) THEN
            INSERT INTO worq_queues (name) VALUES (p_queues[1]) ON CONFLICT DO NOTHING;
        END IF;
        IF p_clear[1] THEN
            DELETE FROM worq_results WHERE id = p_ids[1];
        END IF;
        PERFORM pg_notify(p_channel, p_queues[1]);
        RETURN NEXT p_ids[1];
        RETURN;
    END IF;
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
        RETURNING worq_jobs.id
    )
    SELECT array_agg(ins.id) INTO v_added FROM ins;
    IF v_added IS NULL THEN
        RETURN;
    END IF;
    INSERT INTO worq_queues (name)
    SELECT DISTINCT q FROM unnest(p_queues) AS q
    WHERE NOT EXISTS (SELECT 1 FROM worq_queues k WHERE k.name = q)
    ORDER BY q
    ON CONFLICT DO NOTHING;
    IF true = ANY (p_clear) THEN
        DELETE FROM worq_results r
        USING unnest(p_ids, p_clear) AS c(id, clear)
        WHERE c.clear AND r.id = c.id AND c.id = ANY (v_added);
    END IF;
    FOR v_queue IN SELECT DISTINCT q FROM unnest(p_queues) AS q LOOP
        PERFORM pg_notify(p_channel, v_queue);
    END LOOP;
    RETURN QUERY SELECT unnest(v_added);
END
$$;
