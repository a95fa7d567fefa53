"""Field types of the request bodies, shared by lorakit's routes and vLLM's (the bodies are strict: no "1"
for 1, no 1 for true, so /openapi.json says exactly what is accepted)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field


def integral(value: Any) -> Any:
    """JSON Schema's integers include 1.0: take an integral float as the int it is (strict mode refuses it)."""
    return int(value) if isinstance(value, float) and value.is_integer() and abs(value) < 2**63 else value


def integer(**bounds: int) -> Any:
    """An int field type with `bounds` (ge, le, lt...) that takes 1.0 as 1; the bounds come before the
    validator, or pydantic writes them into the JSON schema as "ge" instead of "minimum"."""
    return Annotated[int, Field(**bounds), BeforeValidator(integral)]
