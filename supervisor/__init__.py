"""The supervisor side of IsoBox: pool, worker handles, watchdog, restart policy, stats."""
