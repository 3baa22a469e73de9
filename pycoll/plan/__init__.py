"""Planning: topologies, ring orders, layouts, the cost model and the plans the engine runs.
Pure: nothing here touches a socket."""
