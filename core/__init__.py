"""Pieces every package may import and that import no package of ours: the config system, the
shard format, checkpoint discovery, frame-sampling geometry and the frozen encoder loaders."""
