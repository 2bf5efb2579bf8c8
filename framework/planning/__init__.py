"""What a run will cost before it starts (the planner) and what it did cost (measured)."""
