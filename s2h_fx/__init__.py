"""s2h-fx: S2HPruner as a torch.fx compiler pass."""
