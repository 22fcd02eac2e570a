"""The engine every bound shares: the read-only interpreter over a traced model, the
input sets, the primitive table, the forward-domain driver and the CPU convolutions."""
