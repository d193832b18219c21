-- worq-postgres schema, version 8: fewer round trips and less work per job.
--
-- * A worker's step (settle the job it ran, lease the next) is one call, worq_settle_fetch:
--   one round trip and one implicit transaction instead of BEGIN, two calls and COMMIT. An
--   idle look gets, in the same call, when the next job comes due.
-- * worq_next_due is PL/pgSQL: a SQL-language function is planned again at every call (about
--   half a millisecond here), a PL/pgSQL one keeps its plans.
-- * worq_enqueue of a single job takes plain statements instead of the set-based path (about
--   1.6 times the calls per second); a batch's uniform columns travel as one element; it
--   answers with the ids it refused (usually none) rather than every id it added; it
--   registers a queue only when it is new, and looks at worq_results only when a record is
--   to be cleared.

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

DROP FUNCTION worq_enqueue(text, text[], text[], bytea[], integer[], float8[], boolean[]);

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
