"""Result tables of the kernel probes (see lsdb.probes)."""
