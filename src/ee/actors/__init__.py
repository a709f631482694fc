"""Domain actors: AgentActor, DatacenterActor (and later AppActor, CapacityPoolActor)."""
