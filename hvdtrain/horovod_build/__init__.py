"""hvdtrain's reproducible Horovod build (see fixes.py for what it changes)."""
from .build import HOROVOD_VERSION, BuildError, BuildPlan, ensure_horovod
from .fixes import FIXES, apply_fixes, fixes_digest

__all__ = ["HOROVOD_VERSION", "BuildError", "BuildPlan", "ensure_horovod",
           "FIXES", "apply_fixes", "fixes_digest"]
