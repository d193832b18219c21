-- worq-postgres schema, version 7: dead-letter retention by count and age, as the other
-- backends have it (a queue keeps its newest dead_max_count dead jobs, none older than
-- dead_max_age).

-- The dead index gains seq, so the newest-first order of a queue's dead jobs (listing, and
-- the count cut-off below) is read from it alone; a second one orders every queue's dead jobs
-- by age, so dropping the old ones costs what is dropped, not what is kept.
DROP INDEX worq_jobs_dead;
CREATE INDEX worq_jobs_dead ON worq_jobs (queue, died_at, seq) WHERE state = 'dead';
CREATE INDEX worq_jobs_died ON worq_jobs (died_at) WHERE state = 'dead';

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
