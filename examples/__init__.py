"""Example specs, shipped inside the package so `lsdb demo` works from a wheel."""
