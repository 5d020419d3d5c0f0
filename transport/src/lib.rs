//! kvwire-transport: pinned regions, fabrics and the per-layer pipeline (not built yet; see issue "Transport").
