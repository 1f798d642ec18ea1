"""What every section of the spec shares: the pydantic base and the common field types."""
from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from ..plugins import IMPORT_PATH

NonNegativeInt = Annotated[int, Field(ge=0)]
ImportPath = Annotated[str, Field(pattern=IMPORT_PATH, description="package.module:function")]
Width = Annotated[int, Field(ge=1, le=65_536)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)
