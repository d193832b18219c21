-- worq-postgres schema, version 4: workflows (a settlement's follow-ups, groups and their
-- callbacks), counted in the transaction that ends each member.

ALTER TABLE worq_jobs
    ADD COLUMN member_group text,
    ADD COLUMN member_index integer,
    ADD COLUMN closes text;

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

DROP FUNCTION worq_enqueue_unique(
    text, text[], text[], bytea[], integer[], float8[], boolean[], text[], text[], float8[]);

-- Enqueue one message after the other, honouring unique keys and recording group membership;
-- per message NULL if added, else the id of the job standing for it. (worq_enqueue remains
-- the set-based path for plain messages.)
CREATE FUNCTION worq_add(
    p_channel text, p_ids text[], p_queues text[], p_bodies bytea[], p_priorities integer[],
    p_etas float8[], p_clear boolean[], p_keys text[], p_untils text[], p_holds float8[],
    p_groups text[], p_indexes integer[], p_closes text[]
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
                               unique_until, unique_hold, member_group, member_index, closes)
        VALUES (p_ids[i], p_queues[i], p_bodies[i], p_priorities[i], nextval('worq_seq'),
                CASE WHEN p_etas[i] IS NOT NULL AND p_etas[i] > v_now
                     THEN 'scheduled' ELSE 'queued' END,
                coalesce(p_etas[i], 0), p_keys[i], p_untils[i], coalesce(p_holds[i], 0),
                p_groups[i], p_indexes[i], p_closes[i])
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
                         ARRAY[g.cb_group], ARRAY[g.cb_index], ARRAY[g.cb_closes]);
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

DROP FUNCTION worq_settle(text, text[], bigint[], text[], float8[], text[], bytea[], float8[]);

-- Settle, now counting group members (with their outputs) and releasing closed groups.
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
                lease_until = NULL, progress = NULL, reason = p_reasons[i]
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

-- Cancel, now counting a removed member as failed and releasing the group it closes.
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
