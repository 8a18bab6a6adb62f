"""The parts of the OMEWriter (`edge_agent.omewriter`): its config, the experiment spec,
frame metadata, the local backend workers and one experiment's bookkeeping."""

from edge_agent.writer.config import (
    LOCAL_BACKENDS,
    SERVER,
    Compression,
    MiB,
    OMEWriterConfig,
    apply_transport,
    confine_output_dir,
    use_transport,
)
from edge_agent.writer.experiment import ExperimentProgress
from edge_agent.writer.experiment_spec import MAX_FRAMES, ExperimentSpec, Grid, Point
from edge_agent.writer.frames import FrameInfo

__all__ = [
    "LOCAL_BACKENDS",
    "MAX_FRAMES",
    "SERVER",
    "Compression",
    "ExperimentProgress",
    "ExperimentSpec",
    "FrameInfo",
    "Grid",
    "MiB",
    "OMEWriterConfig",
    "Point",
    "apply_transport",
    "confine_output_dir",
    "use_transport",
]
