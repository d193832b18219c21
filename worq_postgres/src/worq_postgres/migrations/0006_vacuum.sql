-- worq-postgres schema, version 6: vacuum the hot tables after a fixed number of dead rows.
-- Every acknowledged job leaves a dead row behind; the default (20% of the table) lets a
-- table that is small but busy pile up dead rows without end, so vacuum by count instead,
-- without throttling. (The broker also vacuums worq_jobs itself when autovacuum lags.)
ALTER TABLE worq_jobs SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 5000
);
ALTER TABLE worq_results SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0
);
