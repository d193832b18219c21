-- worq-postgres schema, version 2: periodic schedules' last fires, and the events stream.

-- One row per schedule: the tick it last fired. fire_schedule() is a compare-and-set on it.
CREATE TABLE worq_schedules (
    name text PRIMARY KEY,
    last_fire float8 NOT NULL
);

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
