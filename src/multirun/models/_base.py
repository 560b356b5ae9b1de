from __future__ import annotations

import uuid
from datetime import datetime, timezone

from pydantic import BaseModel, ConfigDict


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Model(BaseModel):
    """Shared configuration: enums serialise as their values, extra fields are refused."""

    model_config = ConfigDict(use_enum_values=False, extra="forbid", validate_assignment=False)
