"""karst-search: the search, tracking, Pareto front, registry and command line around `karst`."""
