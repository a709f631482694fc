"""Load generation: many simulated agents over real websockets from one process."""
