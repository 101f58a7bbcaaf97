"""Native torch ODE solvers: tableaus, the adaptive RK loop, fixed-grid and Adams methods."""
