"""GiPH-style GNN placement policy."""
