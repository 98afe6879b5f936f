"""Writes json_schemas.json: the JSON Schemas of the structured-output conformance test.

Each is what Pydantic (``model_json_schema``) or LangChain (``convert_to_json_schema``, as
``with_structured_output`` sends it) emits for a model built from a seeded mix of the field kinds
RAG extraction steps use: nested objects, arrays, enums, optional fields, unions (``anyOf``),
``$defs``/``$ref``, string formats and numeric bounds. Run it again only to change the set:

    .venv/bin/python tests/data/make_json_schemas.py
"""

from __future__ import annotations

import datetime
import enum
import json
import random
import uuid
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from langchain_core.utils.function_calling import convert_to_json_schema
from pydantic import BaseModel, Field, create_model

COUNT = 120
OUT = Path(__file__).with_name("json_schemas.json")


class Priority(str, enum.Enum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


class Source(BaseModel):
    """A document the answer draws on."""

    doc_id: str
    page: Annotated[int, Field(ge=1, le=999)]


class Person(BaseModel):
    name: Annotated[str, Field(min_length=1, max_length=40)]
    role: Optional[str] = None


class Money(BaseModel):
    amount: Annotated[float, Field(ge=0)]
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")]


FIELD_KINDS = {
    "text": str,
    "count": int,
    "score": float,
    "flag": bool,
    "age": Annotated[int, Field(ge=0, le=120)],
    "confidence": Annotated[float, Field(ge=0.0, le=1.0, description="between 0 and 1")],
    "short_title": Annotated[str, Field(min_length=2, max_length=30)],
    "code": Annotated[str, Field(pattern=r"^[A-Z]{2}-[0-9]{3}$")],
    "level": Literal["low", "medium", "high"],
    "priority": Priority,
    "note": Optional[str],
    "maybe_count": Optional[int],
    "keywords": Annotated[list[str], Field(max_length=5)],
    "numbers": Annotated[list[int], Field(min_length=1, max_length=4)],
    "source": Source,
    "sources": Annotated[list[Source], Field(max_length=3)],
    "author": Person,
    "price": Money,
    "id_or_name": Union[int, str],
    "date": datetime.date,
    "timestamp": datetime.datetime,
    "uuid": uuid.UUID,
    "email": Annotated[str, Field(json_schema_extra={"format": "email"})],
    "counts": Annotated[dict[str, int], Field(max_length=3)],
    "tags": Annotated[list[Literal["fact", "opinion", "question"]], Field(max_length=3)],
    "mentions": list[str],
    "nested_lists": list[list[int]],
}
NAMES = [
    "Answer",
    "Extraction",
    "Grade",
    "Route",
    "Summary",
    "Claim",
    "Entity",
    "Event",
    "Query",
    "Record",
]


def model(index: int, rng: random.Random) -> type[BaseModel]:
    kinds = rng.sample(sorted(FIELD_KINDS), rng.randint(1, 5))
    fields = {}
    for kind in kinds:
        annotation = FIELD_KINDS[kind]
        optional = kind in ("note", "maybe_count") or rng.random() < 0.15
        fields[kind] = (Optional[annotation] if optional else annotation, None if optional else ...)
    name = f"{NAMES[index % len(NAMES)]}{index}"
    return create_model(name, __doc__=f"{name}: fields {', '.join(kinds)}.", **fields)


def main() -> None:
    rng = random.Random(13)
    schemas = []
    for index in range(COUNT):
        built = model(index, rng)
        emitted_by = "langchain" if index % 3 == 0 else "pydantic"
        schema = (
            convert_to_json_schema(built)
            if emitted_by == "langchain"
            else built.model_json_schema()
        )
        schemas.append({"name": built.__name__, "emitted_by": emitted_by, "schema": schema})
    OUT.write_text(json.dumps(schemas, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(schemas)} schemas to {OUT}")


if __name__ == "__main__":
    main()
