"""worq-redis: the Redis broker and result storage behind ``redis://``, ``rediss://`` and ``unix://``."""
