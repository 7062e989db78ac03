"""kibble bench: the benchmark groups."""
