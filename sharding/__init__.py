"""Embedding sharding: the cluster topology, sharders for the EBC and EC, per-table constraints from
the config, and the planner's plan as a table."""
