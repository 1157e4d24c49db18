"""oba: Hessian-based neural-network pruning (Optimal Brain Apoptosis and the OBD/OBS family)."""
