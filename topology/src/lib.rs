//! kvwire-topology: NICs, GPUs, NUMA and link tiers (not built yet; see issue "Topology").
