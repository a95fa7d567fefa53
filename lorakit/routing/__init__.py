"""Which adapter each call and row uses: the per-call context, the slot table, route resolution."""
