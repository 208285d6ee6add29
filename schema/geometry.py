"""Result tables of the geometry probes (see lsdb.probes)."""
