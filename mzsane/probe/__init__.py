"""Property probes: what a backbone's embeddings say about a model's accuracy, epoch and generalization gap."""
