"""The RELEX engine: checkpoints in, streaming rank-1 trajectory model, previews out."""

from relexd.engine.config import DEFAULT_RANK, EngineConfig
from relexd.engine.engine import Engine
from relexd.engine.ingest import IngestReport, Interrupted

__all__ = ["DEFAULT_RANK", "Engine", "EngineConfig", "IngestReport", "Interrupted"]
